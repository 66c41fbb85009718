#!/usr/bin/env python3
"""HellaSwag-format evaluation: falcon-infer against the peers, in one run, same threads.

    bench/eval-vs-peers.py speed --gguf G --checkpoint CK --data DIR [--limit N] [--threads T]
        [--llama-perplexity BIN] [--harness-python PY | --no-harness]
    bench/eval-vs-peers.py quality --checkpoint CK --data DIR [--types f32,f16,...]

`speed` scores the same items (DIR/validation.jsonl, HellaSwag's fields; see
bench/make-hellaswag-items.py) three ways and prints items per second and the ratios:

  falcon-infer       `falcon-infer eval --task hellaswag` on the GGUF G;
  llama-perplexity   llama.cpp's `llama-perplexity --hellaswag` on the same G, the items
                     written in its own text layout (six lines per item: the preprocessed
                     context, the right ending's index, the four preprocessed endings);
  harness            EleutherAI's lm-evaluation-harness at the Open LLM Leaderboard's commit
                     (b281b09), its `hf-causal-experimental` model (transformers) on the
                     checkpoint CK on the CPU, batch size 1 as the leaderboard ran it, in
                     bfloat16 (the Falcon blog's way; --harness-dtypes bfloat16,float32 runs
                     both). Run by --harness-python (a Python with that harness, torch and
                     transformers installed) on this same file's `harness-worker` command.

Each tool runs as its own process and is timed from start to exit (loading included); the
harness is also timed over its `evaluate` call alone (loading and imports excluded), the
figure most favourable to it. --reps N runs falcon-infer and llama-perplexity N times,
alternating, and keeps each one's fastest run. The shot count is 0: llama-perplexity has
no few-shot mode. The KV budget is the same for both llama.cpp-based tools (--ctx-size
cells; llama-perplexity gets it as `-c ctx/128 -np 128`, its largest number of sequences).

`quality` converts CK to every --types file type with falcon-quantize, evaluates each with
`falcon-infer eval --json`, the f32 file first, and the others with `--reference` to it, and
prints a Markdown table: acc, acc_norm, agreement of predictions and the mean and largest
|difference| of the choices' log-likelihoods against f32.

Needs release builds of falcon-infer and falcon-quantize (--bin-dir, default target/release).
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS_COMMIT = "b281b0921b636bc36ad05c0b0b0763bd6dd43463"
LP_SEQS = 128  # llama-perplexity's hellaswag uses at most 4 * 32 sequence ids per batch


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_items(items, path):
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")


def hs_clean(text):
    """HellaSwag's text clean-up as the harness applies it to the query and each ending:
    trimmed, WikiHow's ' [title]' markers made sentence breaks, other [bracketed] markers
    dropped, doubled spaces made single (one pass)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def to_llama_perplexity(items, path):
    """llama-perplexity's --hellaswag input: six lines per item. It scores `context + " " +
    ending`, the harness's context and target delimiter."""
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            query = hs_clean(it["activity_label"] + ": " + it["ctx_a"] + " " + it["ctx_b"].capitalize())
            endings = [hs_clean(e) for e in it["endings"]]
            for line in [query, str(int(it["label"]))] + endings:
                if "\n" in line:
                    sys.exit(f"item {it.get('ind')}: a newline inside a field cannot go into "
                             "llama-perplexity's line-based layout")
                f.write(line + "\n")


def timed(cmd, env=None):
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\nexited {p.returncode}:\n{p.stderr[-3000:]}")
    return wall, p


# ------------------------------------------------------------------------------------------
# The three runners
# ------------------------------------------------------------------------------------------

def run_falcon(a, data, out_json):
    cmd = [os.path.join(a.bin_dir, "falcon-infer"), "eval", "--model", a.gguf, "--task", "hellaswag",
           "--data", data, "--shots", "0", "--threads", str(a.threads), "--ctx-size", str(a.ctx_size),
           "--json", out_json]
    wall, _ = timed(cmd)
    rep = json.load(open(out_json, encoding="utf-8"))
    return wall, {k: v["value"] for k, v in rep["metrics"].items()}, cmd


def run_llama_perplexity(a, lp_file, n):
    cmd = [a.llama_perplexity, "-m", a.gguf, "-f", lp_file, "--hellaswag", "--hellaswag-tasks", str(n),
           "-t", str(a.threads), "-tb", str(a.threads), "-c", str(a.ctx_size // LP_SEQS),
           "-np", str(LP_SEQS), "-b", str(a.ctx_size), "-ngl", "0"]
    wall, p = timed(cmd)
    rows = re.findall(r"^(\d+)\t([0-9.]+)%\t", p.stdout + p.stderr, re.M)
    if not rows or int(rows[-1][0]) != n:
        sys.exit(f"llama-perplexity scored {rows[-1][0] if rows else 0} of {n} items:\n{p.stderr[-3000:]}")
    return wall, {"acc_norm (per token)": float(rows[-1][1]) / 100}, cmd


def run_harness(a, data_dir, dtype):
    cmd = [a.harness_python, os.path.abspath(__file__), "harness-worker", "--checkpoint", a.checkpoint,
           "--data", data_dir, "--threads", str(a.threads), "--dtype", dtype,
           "--batch-size", str(a.harness_batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    wall, p = timed(cmd, env)
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    return wall, doc, cmd


def harness_worker(a):
    """Runs inside the harness's Python: the leaderboard's evaluator on our files."""
    import torch
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    import lm_eval.evaluator
    import lm_eval.models
    from lm_eval.tasks import hellaswag
    import transformers

    class LocalHellaSwag(hellaswag.HellaSwag):
        """The harness's HellaSwag; only where it reads the data differs."""
        def download(self, *args, **kwargs):
            self.dataset = {"train": read_jsonl(os.path.join(a.data, "train.jsonl")),
                            "validation": read_jsonl(os.path.join(a.data, "validation.jsonl"))}

    lm = lm_eval.models.get_model("hf-causal-experimental").create_from_arg_string(
        f"pretrained={a.checkpoint},dtype={a.dtype}", {"batch_size": a.batch_size, "device": "cpu"})
    task = LocalHellaSwag()
    t1 = time.perf_counter()
    out = lm_eval.evaluator.evaluate(lm=lm, task_dict={"hellaswag": task}, num_fewshot=0, limit=None,
                                     bootstrap_iters=100000, description_dict=None)
    t2 = time.perf_counter()
    res = out["results"]["hellaswag"]
    print(json.dumps({"load_s": t1 - t0, "eval_s": t2 - t1,
                      "metrics": {k: res[k] for k in ("acc", "acc_norm")},
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads()}))


# ------------------------------------------------------------------------------------------
# speed
# ------------------------------------------------------------------------------------------

def speed(a, work):
    items = read_jsonl(os.path.join(a.data, "validation.jsonl"))
    if a.limit:
        items = items[:a.limit]
    n = len(items)
    data_dir = os.path.join(work, "data")
    os.makedirs(data_dir)
    write_items(items, os.path.join(data_dir, "validation.jsonl"))
    train = os.path.join(a.data, "train.jsonl")
    write_items(read_jsonl(train) if os.path.exists(train) else [], os.path.join(data_dir, "train.jsonl"))
    lp_file = os.path.join(work, "hellaswag.txt")
    to_llama_perplexity(items, lp_file)

    print(f"{n} items, 0-shot, {a.threads} threads, {a.ctx_size} KV cells; GGUF {a.gguf}; "
          f"checkpoint {a.checkpoint}", flush=True)
    rows = {}
    for rep in range(a.reps):
        wall, metrics, cmd = run_falcon(a, os.path.join(data_dir, "validation.jsonl"),
                                        os.path.join(work, "falcon.json"))
        print(f"[{rep + 1}/{a.reps}] falcon-infer      {wall:8.2f} s  {' '.join(cmd)}", flush=True)
        if "falcon-infer" not in rows or wall < rows["falcon-infer"][0]:
            rows["falcon-infer"] = (wall, metrics)
        if a.llama_perplexity:
            wall, metrics, cmd = run_llama_perplexity(a, lp_file, n)
            print(f"[{rep + 1}/{a.reps}] llama-perplexity  {wall:8.2f} s  {' '.join(cmd)}", flush=True)
            if "llama-perplexity" not in rows or wall < rows["llama-perplexity"][0]:
                rows["llama-perplexity"] = (wall, metrics)
    harness = {}
    for dtype in (a.harness_dtypes.split(",") if a.harness_python else []):
        wall, doc, cmd = run_harness(a, data_dir, dtype)
        print(f"[1/1] harness {dtype:9s}  {wall:8.2f} s  {' '.join(cmd)}", flush=True)
        rows[f"harness {dtype}"] = (wall, doc["metrics"])
        rows[f"harness {dtype} (evaluate only)"] = (doc["eval_s"], doc["metrics"])
        harness[dtype] = doc

    print(f"\n| tool | wall (s) | items/s | metrics |\n| --- | ---: | ---: | --- |")
    for name, (wall, metrics) in rows.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"| {name} | {wall:.2f} | {n / wall:.2f} | {shown} |")
    ours = rows["falcon-infer"][0]
    print()
    for name in rows:
        if name != "falcon-infer":
            target = 1.0 if name == "llama-perplexity" else 10.0
            r = rows[name][0] / ours
            print(f"falcon-infer vs {name}: {r:.2f}x  (target >= {target:g}x: "
                  f"{'met' if r >= target else 'MISSED'})")
    for dtype, doc in harness.items():
        print(f"harness {dtype}: torch {doc['torch']}, transformers {doc['transformers']}, "
              f"{doc['threads']} threads, batch size {a.harness_batch_size}, load {doc['load_s']:.1f} s")
    if a.json:
        json.dump({"items": n, "threads": a.threads, "ctx_size": a.ctx_size, "gguf": a.gguf,
                   "checkpoint": a.checkpoint, "machine": platform.platform(),
                   "rows": {k: {"wall_s": w, "items_per_s": n / w, "metrics": m} for k, (w, m) in rows.items()},
                   "harness": harness}, open(a.json, "w"), indent=1)


# ------------------------------------------------------------------------------------------
# quality
# ------------------------------------------------------------------------------------------

def quality(a, work):
    data = os.path.join(a.data, "validation.jsonl")
    fq = os.path.join(a.bin_dir, "falcon-quantize")
    fi = os.path.join(a.bin_dir, "falcon-infer")
    types = a.types.split(",")
    if types[0] != "f32":
        types = ["f32"] + [t for t in types if t != "f32"]
    ref = os.path.join(work, "f32.json")
    print("| type | file (bytes) | acc | acc_norm | agreement acc | agreement acc_norm | mean \\|Δ loglik\\| | largest \\|Δ loglik\\| |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in types:
        gguf = os.path.join(work, f"model-{t}.gguf")
        subprocess.run([fq, a.checkpoint, "-o", gguf, "--type", t, "--quiet"], check=True)
        out = os.path.join(work, f"{t}.json")
        cmd = [fi, "eval", "--model", gguf, "--task", "hellaswag", "--data", data, "--shots", "0",
               "--threads", str(a.threads), "--json", out]
        if t != "f32":
            cmd += ["--reference", ref]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)}\nexited {p.returncode}:\n{p.stderr[-2000:]}")
        rep = json.load(open(out, encoding="utf-8"))
        m = {k: v["value"] for k, v in rep["metrics"].items()}
        if t == "f32":
            agree_acc = agree_norm = "100.00%"
            mean_d, max_d = "0", "0"
        else:
            text = p.stdout
            agree_acc = re.search(r"agreement acc\s+([0-9.]+%)", text).group(1)
            agree_norm = re.search(r"agreement acc_norm\s+([0-9.]+%)", text).group(1)
            d = re.search(r"mean \|Δ loglik\| ([0-9.e-]+) \(largest ([0-9.e-]+)\)", text)
            mean_d, max_d = d.group(1), d.group(2)
        print(f"| {t} | {os.path.getsize(gguf):,} | {m['acc']:.4f} | {m['acc_norm']:.4f} | {agree_acc} | "
              f"{agree_norm} | {mean_d} | {max_d} |", flush=True)
        if t != "f32":
            os.remove(gguf)


def run_in_scratch(f, a, prefix):
    """f(a, work) with a scratch directory that is removed afterwards, whatever happens."""
    work = tempfile.mkdtemp(prefix=prefix)
    try:
        f(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed", help="items per second against llama-perplexity and the harness")
    s.add_argument("--gguf", required=True)
    s.add_argument("--checkpoint", required=True, help="the checkpoint the harness runs (bf16 safetensors)")
    s.add_argument("--data", required=True, help="a directory with validation.jsonl (and train.jsonl)")
    s.add_argument("--limit", type=int, help="only the first N items of validation.jsonl")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--ctx-size", type=int, default=4096, help="KV cells, for both llama.cpp-based tools")
    s.add_argument("--reps", type=int, default=1)
    s.add_argument("--llama-perplexity", help="llama.cpp's llama-perplexity binary")
    s.add_argument("--harness-python", help="a Python with lm-evaluation-harness b281b09, torch, transformers")
    s.add_argument("--harness-dtypes", default="bfloat16",
                   help="the checkpoint's dtype(s) in the harness, comma-separated (bfloat16, float32)")
    s.add_argument("--harness-batch-size", default="1")
    s.add_argument("--bin-dir", default=os.path.join(ROOT, "target/release"))
    s.add_argument("--json", help="also write the figures to this file")
    q = sub.add_parser("quality", help="accuracy and log-likelihood differences of every file type")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--data", required=True)
    q.add_argument("--types", default="f32,f16,bf16,q8_0,q6_k,q5_k_m,q5_1,q5_0,q4_k_m,q4_1,q4_0")
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--bin-dir", default=os.path.join(ROOT, "target/release"))
    w = sub.add_parser("harness-worker", help=argparse.SUPPRESS)
    w.add_argument("--checkpoint", required=True)
    w.add_argument("--data", required=True)
    w.add_argument("--threads", type=int, required=True)
    w.add_argument("--dtype", required=True)
    w.add_argument("--batch-size", required=True)
    a = ap.parse_args()
    if a.cmd == "speed":
        a.gguf, a.checkpoint = os.path.abspath(a.gguf), os.path.abspath(a.checkpoint)
        run_in_scratch(speed, a, "eval-vs-peers-")
    elif a.cmd == "quality":
        run_in_scratch(quality, a, "eval-quality-")
    else:
        harness_worker(a)


if __name__ == "__main__":
    main()
