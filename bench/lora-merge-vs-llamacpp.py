#!/usr/bin/env python3
"""Merging a PEFT LoRA adapter while quantizing (falcon-quantize CKPT --lora ADAPTER) against the
same conversion without the adapter, and against llama.cpp's route to the same merged Q4_0 file:
convert_lora_to_gguf.py (adapter -> GGUF), convert_hf_to_gguf.py (checkpoint -> f16 GGUF),
llama-export-lora (merge on the f16 model), llama-quantize (-> Q4_0). Wall time and peak RSS of
each step, in one run; prints a table and the ratios.

usage: bench/lora-merge-vs-llamacpp.py CHECKPOINT ADAPTER LLAMA_CPP_DIR
           [--work DIR] [--python PY] [--threads 2] [--reps 3] [--type q4_0] [--cold]

  CHECKPOINT     a Falcon checkpoint directory, e.g. from
                 `target/release/falcon-quantize synth --shape falcon-7b -o DIR`
  ADAPTER        a PEFT adapter directory for it, e.g. from bench/make-lora-adapter.py
  LLAMA_CPP_DIR  a llama.cpp source tree with build/bin/llama-export-lora and llama-quantize
                 built; its converters run under --python (torch, transformers, numpy)
  --work         where outputs and intermediates go (default /tmp/lora-bench); each is deleted
                 as soon as its step is measured
  --cold         evict the checkpoint's and the adapter's pages from the page cache before each
                 step (posix_fadvise DONTNEED: only these files, nothing else on the machine), so
                 each step reads them from disk; intermediates written by the previous step stay
                 cached either way

Build falcon-quantize first (`cargo build --release --bin falcon-quantize`). Each step is run one
after the other with --threads threads. The page cache is not dropped (the machine may be
shared); without --cold the checkpoint is read once before the first step so that every step
reads it from memory. The falcon-quantize runs with and without the adapter alternate, --reps times each.
Peak RSS is the kernel's ru_maxrss of the step's process (os.wait4), file-backed pages included.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))


def evict(paths):
    """Drop the files' clean pages from the page cache."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Runner:
    def __init__(self, work, env, cold_files):
        self.work = work
        self.env = env
        self.cold_files = cold_files
        self.rows = []  # (name, wall_s, maxrss_bytes, output_bytes or None, cpu_s)

    def run(self, name, cmd, output=None, record=True):
        """Run cmd to completion; returns (ok, wall_s, maxrss_bytes, cpu_s, last lines of its
        log). cpu_s is user + system time, less sensitive than wall time to a shared machine."""
        log = os.path.join(self.work, name.replace(" ", "_") + ".log")
        evict(self.cold_files)
        with open(log, "wb") as f:
            t0 = time.monotonic()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        rss = ru.ru_maxrss * 1024
        cpu = ru.ru_utime + ru.ru_stime
        with open(log, "rb") as f:
            tail = f.read().decode("utf-8", "replace").replace("\r", "\n").strip().splitlines()[-3:]
        ok = p.returncode == 0
        out_bytes = os.path.getsize(output) if ok and output and os.path.exists(output) else None
        print(f"  {name:34s} {'ok' if ok else 'FAILED (exit %d)' % p.returncode:>16s} "
              f"{wall:8.1f} s {cpu:8.1f} s CPU {rss / 1e6:9.0f} MB", flush=True)
        if record and ok:
            self.rows.append((name, wall, rss, out_bytes, cpu))
        return ok, wall, rss, cpu, tail


def config_for_llama_cpp(checkpoint, dest):
    """A view of the checkpoint (symlinks) whose config.json gives a multi-query (7B-style)
    model num_kv_heads = 1, the count llama.cpp's Falcon converter expects; current
    transformers writes num_attention_heads there. None when the config needs no change."""
    with open(os.path.join(checkpoint, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("new_decoder_architecture") or not cfg.get("multi_query", True) \
            or cfg.get("num_kv_heads", 1) == 1:
        return None
    os.makedirs(dest, exist_ok=True)
    for f in os.listdir(checkpoint):
        if f != "config.json":
            link = os.path.join(dest, f)
            if not os.path.lexists(link):
                os.symlink(os.path.join(os.path.abspath(checkpoint), f), link)
    cfg["num_kv_heads"] = 1
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return dest


def merge_flop(safetensors_path):
    """Multiply-adds of the merge, 2 · out · rank · in over the lora_B / lora_A pairs, from the
    safetensors header (8-byte length, then JSON)."""
    with open(safetensors_path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    total = 0
    for k, v in header.items():
        if k.endswith("lora_B.weight"):
            a = header[k.replace("lora_B", "lora_A")]["shape"]
            total += 2 * v["shape"][0] * v["shape"][1] * a[1]
    return total


def rm(*paths):
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("adapter")
    ap.add_argument("llama_cpp")
    ap.add_argument("--work", default="/tmp/lora-bench")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--type", default="q4_0")
    ap.add_argument("--cold", action="store_true")
    a = ap.parse_args()

    fq = os.path.join(ROOT, "target", "release", "falcon-quantize")
    export_lora = os.path.join(a.llama_cpp, "build", "bin", "llama-export-lora")
    quantize = os.path.join(a.llama_cpp, "build", "bin", "llama-quantize")
    for path, what in [(fq, "cargo build --release --bin falcon-quantize"),
                       (export_lora, "cmake --build build --target llama-export-lora"),
                       (quantize, "cmake --build build --target llama-quantize")]:
        if not os.access(path, os.X_OK):
            die(f"{path} is missing: build it with `{what}`")
    for f in ["config.json"]:
        if not os.path.isfile(os.path.join(a.checkpoint, f)):
            die(f"{a.checkpoint}/{f} is missing: CHECKPOINT must be a Falcon checkpoint directory")
    st = os.path.join(a.adapter, "adapter_model.safetensors")
    if not os.path.isfile(st):
        die(f"{st} is missing: ADAPTER must be a PEFT adapter directory")

    os.makedirs(a.work, exist_ok=True)
    t = str(a.threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, TOKENIZERS_PARALLELISM="false")
    files = lambda d: [os.path.join(d, f) for f in sorted(os.listdir(d))
                       if os.path.isfile(os.path.join(d, f))]
    r = Runner(a.work, env, files(a.checkpoint) + files(a.adapter) if a.cold else [])
    adapter_bytes = os.path.getsize(st)
    ck_bytes = dir_bytes(a.checkpoint)
    print(f"checkpoint {a.checkpoint}: {ck_bytes / 1e9:.2f} GB; adapter {a.adapter}: "
          f"{adapter_bytes / 1e6:.1f} MB; {a.threads} threads; {a.reps} reps; "
          f"{'cold (read from disk)' if a.cold else 'warm (page cache)'}")

    if not a.cold:
        # Read the checkpoint once so that every step finds it in the page cache.
        for f in files(a.checkpoint):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass

    # 1. falcon-quantize with and without the adapter, alternating.
    out = os.path.join(a.work, "falcon.gguf")
    base_runs, lora_runs = [], []
    for i in range(a.reps):
        for with_lora, runs in ((False, base_runs), (True, lora_runs)):
            cmd = [fq, a.checkpoint, "-o", out, "--type", a.type, "-t", t, "--quiet"]
            if with_lora:
                cmd[2:2] = ["--lora", a.adapter]
            name = f"falcon-quantize{' --lora' if with_lora else ''} #{i + 1}"
            ok, wall, rss, cpu, tail = r.run(name, cmd, output=out, record=False)
            if not ok:
                die(f"{name} failed: {' | '.join(tail)}")
            runs.append((wall, rss, os.path.getsize(out), cpu))
            rm(out)

    # 2. llama.cpp's route. Each converter is first given the checkpoint as it is; if that fails,
    # the failure is reported and the converter is run on a copy of the config it accepts.
    findings = []
    lcfg = config_for_llama_cpp(a.checkpoint, os.path.join(a.work, "ckpt-for-llama.cpp"))

    def converter(name, script, args_for, output):
        for base in [a.checkpoint] + ([lcfg] if lcfg else []):
            ok, wall, rss, cpu, tail = r.run(name, [a.python, os.path.join(a.llama_cpp, script)]
                                        + args_for(base), output=output)
            if ok:
                if base != a.checkpoint:
                    findings.append(f"{script} succeeded on a copy whose config.json says "
                                    "num_kv_heads = 1")
                return True
            findings.append(f"{script} on {'the checkpoint as is' if base == a.checkpoint else 'the fixed config'}"
                            f" failed: {tail[-1] if tail else '(no output)'}")
            rm(output)
        return False

    lora_gguf = os.path.join(a.work, "adapter-f16.gguf")
    f16 = os.path.join(a.work, "model-f16.gguf")
    merged = os.path.join(a.work, "merged-f16.gguf")
    q = os.path.join(a.work, f"merged-{a.type}.gguf")
    have_lora = converter("convert_lora_to_gguf.py", "convert_lora_to_gguf.py",
                          lambda base: [a.adapter, "--base", base, "--outtype", "f16",
                                        "--outfile", lora_gguf], lora_gguf)
    have_f16 = converter("convert_hf_to_gguf.py", "convert_hf_to_gguf.py",
                         lambda base: [base, "--outtype", "f16", "--outfile", f16], f16)
    to_quantize = f16
    if have_lora and have_f16:
        ok, _, _, _, tail = r.run("llama-export-lora", [export_lora, "-m", f16, "--lora", lora_gguf,
                                                     "-o", merged, "-t", t], output=merged)
        rm(f16, lora_gguf)
        if ok:
            to_quantize = merged
        else:
            findings.append(f"llama-export-lora failed: {tail[-1] if tail else ''}")
            rm(merged)
    complete = to_quantize == merged
    if os.path.exists(to_quantize):
        ok, _, _, _, tail = r.run("llama-quantize" + ("" if complete else " (unmerged f16)"),
                               [quantize, to_quantize, q, a.type.upper(), t], output=q)
        if not ok:
            findings.append(f"llama-quantize failed: {tail[-1] if tail else ''}")
            complete = False
    rm(f16, lora_gguf, merged, q)

    # Report.
    med = lambda runs, k: statistics.median(x[k] for x in runs)
    b_wall, l_wall = med(base_runs, 0), med(lora_runs, 0)
    b_rss, l_rss = max(x[1] for x in base_runs), max(x[1] for x in lora_runs)
    print("\n| step | wall (s) | CPU user+sys (s) | peak RSS (MB) | output (MB) |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for name, runs in ((f"falcon-quantize → {a.type}", base_runs),
                       (f"falcon-quantize --lora → {a.type}", lora_runs)):
        walls = ", ".join(f"{x[0]:.1f}" for x in runs)
        print(f"| {name} (median of {walls}) | {med(runs, 0):.1f} | {med(runs, 3):.1f} | "
              f"{max(x[1] for x in runs) / 1e6:,.0f} | {runs[0][2] / 1e6:,.0f} |")
    for name, wall, rss, ob, cpu in r.rows:
        print(f"| llama.cpp: {name} | {wall:.1f} | {cpu:.1f} | {rss / 1e6:,.0f} | "
              f"{'' if ob is None else f'{ob / 1e6:,.0f}'} |")
    l_total = sum(x[1] for x in r.rows)
    l_peak = max((x[2] for x in r.rows), default=0)
    l_cpu = sum(x[4] for x in r.rows)
    print(f"| llama.cpp route, total{'' if complete else ' (INCOMPLETE)'} | {l_total:.1f} | "
          f"{l_cpu:.1f} | {l_peak / 1e6:,.0f} (largest step) | |")
    print()
    over = (l_wall - b_wall) / b_wall * 100
    b_cpu, l_cpu_f = med(base_runs, 3), med(lora_runs, 3)
    print(f"merge overhead: {over:+.1f}% wall time ({b_wall:.1f} s -> {l_wall:.1f} s; target <= +10%), "
          f"{(l_cpu_f - b_cpu) / b_cpu * 100:+.1f}% CPU time ({b_cpu:.1f} s -> {l_cpu_f:.1f} s)")
    flop = merge_flop(st)
    print(f"the merge's products B·A: {flop / 1e9:.0f} GFLOP, "
          f"{flop / 1e9 / max(l_wall - b_wall, 1e-9):.0f} GFLOP/s of the extra wall time")
    b_mrss, l_mrss = med(base_runs, 1), med(lora_runs, 1)
    print(f"peak RSS: highest {b_rss / 1e6:.0f} MB -> {l_rss / 1e6:.0f} MB "
          f"({(l_rss - b_rss) / 1e6:+.0f} MB), median {b_mrss / 1e6:.0f} MB -> {l_mrss / 1e6:.0f} MB "
          f"({(l_mrss - b_mrss) / 1e6:+.0f} MB), against the adapter's {adapter_bytes / 1e6:.0f} MB "
          "(target: <= the adapter)")
    if r.rows:
        print(f"falcon-quantize --lora against llama.cpp's route{'' if complete else ' (incomplete)'}: "
              f"{l_total / l_wall:.2f}x faster, {l_peak / l_rss:.1f}x less peak memory "
              f"({l_wall:.1f} s vs {l_total:.1f} s; {l_rss / 1e6:.0f} MB vs {l_peak / 1e6:.0f} MB)")
    for f in findings:
        print(f"finding: {f}")
    shutil.rmtree(os.path.join(a.work, "ckpt-for-llama.cpp"), ignore_errors=True)


if __name__ == "__main__":
    main()
