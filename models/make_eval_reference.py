#!/usr/bin/env python3
"""lm-evaluation-harness's own results on the small task files in tests/data/eval/.

Runs EleutherAI's lm-evaluation-harness at the commit the (v1) Open LLM Leaderboard used
(b281b0921b636bc36ad05c0b0b0763bd6dd43463), unmodified, with its `hf-causal-experimental`
model on models/falcon-mini in float32 on the CPU, batch size 1, over the task files in
tests/data/eval/, and writes tests/data/eval/reference.json: for every task, every request's
context and continuation strings and token ids (as the harness tokenizes them), its summed
log-likelihood and is_greedy, the per-item metrics and the task metrics with their standard
errors, exactly as the harness computed them. The only thing replaced is where each task
reads its data: a subclass's `download` reads our JSON Lines files instead of the Hub.

It also writes the Parquet copies of two task files (arc/test.parquet,
truthfulqa/validation.parquet) that the loader tests read.

Floats are written twice: as JSON numbers and as `float.hex()` strings, so that tests can
compare bit for bit.

Setup (the harness of that commit wants transformers 4 and sacrebleu 1.5):
    python3 -m venv venv-harness && . venv-harness/bin/activate
    pip install torch "transformers>=4.57,<5" "datasets>=3.6,<4" "sacrebleu==1.5.0" pyarrow \\
        accelerate peft sqlitedict pytablewriter rouge-score scikit-learn omegaconf zstandard \\
        jsonlines numexpr pycountry tqdm-multiprocess pybind11 openai
    pip install --no-deps "lm_eval @ git+https://github.com/EleutherAI/lm-evaluation-harness@b281b0921b636bc36ad05c0b0b0763bd6dd43463"
    python3 models/make_eval_reference.py

Takes about a minute on one core. Deterministic: one thread, fixed data, the harness's
fixed seed (42).
"""

import json
import math
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO / "tests" / "data" / "eval"
MODEL = HERE / "falcon-mini"
HARNESS_COMMIT = "b281b0921b636bc36ad05c0b0b0763bd6dd43463"
SEED = 42  # hard-coded in the harness's evaluator at that commit

try:
    import lm_eval.base
    import lm_eval.evaluator
    import lm_eval.models
    from lm_eval.tasks import arc, hellaswag, hendrycks_test, truthfulqa, winogrande
except Exception as e:  # noqa: BLE001
    sys.exit(f"lm-evaluation-harness at {HARNESS_COMMIT[:7]} is not importable ({e}); see the "
             "setup in this script's docstring")

if not (hasattr(lm_eval.base.BaseLM, "_encode_pair")
        and hendrycks_test.GeneralHendrycksTest.VERSION == 1):
    sys.exit(f"this lm_eval is not the harness at {HARNESS_COMMIT[:7]} (the leaderboard's): "
             "see the setup in this script's docstring")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------
# The harness's tasks, reading our files. Nothing but `download` is overridden.
# ----------------------------------------------------------------------------------------

class LocalArc(arc.ARCChallenge):
    def download(self, *args, **kwargs):
        self.dataset = {"train": read_jsonl(DATA / "arc/train.jsonl"),
                        "test": read_jsonl(DATA / "arc/test.jsonl")}


class LocalHellaSwag(hellaswag.HellaSwag):
    def download(self, *args, **kwargs):
        self.dataset = {"train": read_jsonl(DATA / "hellaswag/train.jsonl"),
                        "validation": read_jsonl(DATA / "hellaswag/validation.jsonl")}


class LocalTruthfulQA(truthfulqa.TruthfulQAMultipleChoice):
    def download(self, *args, **kwargs):
        self.dataset = {"validation": read_jsonl(DATA / "truthfulqa/validation.jsonl")}


class LocalWinogrande(winogrande.Winogrande):
    def download(self, *args, **kwargs):
        self.dataset = {"train": read_jsonl(DATA / "winogrande/train.jsonl"),
                        "validation": read_jsonl(DATA / "winogrande/validation.jsonl")}


def local_mmlu(subject):
    """The harness makes one task per subject (hendrycksTest-<subject>), each reading the
    subject's configuration of cais/mmlu; ours reads the rows of that subject."""
    class LocalMmlu(hendrycks_test.GeneralHendrycksTest):
        def __init__(self):
            super().__init__(subject)

        def download(self, *args, **kwargs):
            pick = lambda rows: [r for r in rows if r["subject"] == subject]
            self.dataset = {"test": pick(read_jsonl(DATA / "mmlu/test.jsonl")),
                            "dev": pick(read_jsonl(DATA / "mmlu/dev.jsonl"))}
    return LocalMmlu()


# name, files, shots, harness task(s)
def task_specs():
    subjects = sorted({r["subject"] for r in read_jsonl(DATA / "mmlu/test.jsonl")})
    return [
        ("arc", "arc/test.jsonl", "arc/train.jsonl", 3, {"arc_challenge": LocalArc()}),
        ("hellaswag", "hellaswag/validation.jsonl", "hellaswag/train.jsonl", 2,
         {"hellaswag": LocalHellaSwag()}),
        ("mmlu", "mmlu/test.jsonl", "mmlu/dev.jsonl", 2,
         {f"hendrycksTest-{s}": local_mmlu(s) for s in subjects}),
        ("truthfulqa", "truthfulqa/validation.jsonl", None, 0,
         {"truthfulqa_mc": LocalTruthfulQA()}),
        ("winogrande", "winogrande/validation.jsonl", "winogrande/train.jsonl", 2,
         {"winogrande": LocalWinogrande()}),
    ]


# ----------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------

class Recorder:
    """The harness reports every loglikelihood answer to its cache hook
    (`add_partial("loglikelihood", (context, continuation), (ll, is_greedy))`)."""

    def __init__(self):
        self.answers = {}

    def add_partial(self, attr, req, res):
        assert attr == "loglikelihood", attr
        if req in self.answers:
            assert self.answers[req] == res, (req, self.answers[req], res)
        self.answers[req] = res


def fx(x):
    """A float as a number and as its exact hex form."""
    x = float(x)
    return {"value": x, "hex": x.hex()}


def encode(lm, context, continuation):
    """The token ids the harness feeds for one request (BaseLM.loglikelihood's branch)."""
    if context == "":
        return [lm.eot_token_id], lm.tok_encode(continuation)
    return lm._encode_pair(context, continuation)


def replay(task, shots, n_docs):
    """The harness's evaluator, replayed with the harness's own task functions: the docs
    shuffled by random.Random(42), then each doc's few-shot context drawn with the same
    generator. Yields (index of the doc in its file, doc, context, requests)."""
    docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
    assert len(docs) == n_docs
    order = list(range(len(docs)))
    random.Random(SEED).shuffle(order)  # the same permutation: it depends on the length only
    rnd = random.Random()
    rnd.seed(SEED)
    original = list(docs)
    rnd.shuffle(docs)
    assert docs == [original[i] for i in order]
    for file_index, doc in zip(order, docs):
        ctx = task.fewshot_context(doc=doc, num_fewshot=shots, rnd=rnd, description="")
        reqs = task.construct_requests(doc, ctx)
        if not isinstance(reqs, (list, tuple)):
            reqs = [reqs]
        yield file_index, doc, ctx, [r.args for r in reqs]


def run_task(lm, name, data, fewshot, shots, tasks):
    rows = read_jsonl(DATA / data)
    recorder = Recorder()
    lm.set_cache_hook(recorder)
    out = lm_eval.evaluator.evaluate(lm=lm, task_dict=tasks, num_fewshot=shots, limit=None,
                                     bootstrap_iters=100000, description_dict=None)
    items, metrics, seen = [], {}, set()
    for task_name, task in tasks.items():
        res = out["results"][task_name]
        metrics[task_name] = {k: fx(v) for k, v in sorted(res.items())}
        file_rows = [i for i, r in enumerate(rows)
                     if name != "mmlu" or r["subject"] == task.DATASET_NAME]
        for order, (local_index, doc, ctx, args) in enumerate(replay(task, shots, len(file_rows))):
            requests = []
            lls = []
            for context, continuation in args:
                ll, greedy = recorder.answers[(context, continuation)]
                seen.add((context, continuation))
                c_ids, k_ids = encode(lm, context, continuation)
                requests.append({
                    "context": context, "continuation": continuation,
                    "context_ids": c_ids, "continuation_ids": k_ids,
                    "loglikelihood": fx(ll), "is_greedy": bool(greedy),
                })
                lls.append(ll)
            per_item = task.process_results(doc, lls)
            items.append({
                "task": task_name,
                "order": order,
                "doc": file_rows[local_index],
                "context": ctx,
                "requests": requests,
                "metrics": {k: fx(v) for k, v in sorted(per_item.items())},
            })
    assert seen == set(recorder.answers), "replayed requests differ from the evaluated ones"
    entry = {
        "data": data, "fewshot_data": fewshot, "shots": shots, "seed": SEED,
        "harness_tasks": list(tasks), "versions": {k: v for k, v in out["versions"].items()},
        "metrics": metrics, "items": items,
    }
    if name == "mmlu":
        # The leaderboard's MMLU: np.mean of the subjects' acc (src/leaderboard/read_evals.py).
        accs = [out["results"][t]["acc"] for t in tasks]
        entry["leaderboard_mean_acc"] = fx(np.mean(np.array(accs)))
    return entry


def encoding_cases(lm):
    """Tokenization corner cases, through the harness's loglikelihood directly."""
    cases = [
        ("", "In the beginning God created the heaven and the earth."),
        ("And God said, ", "Let there be light"),
        ("And God said,\n\n", "Let there be light"),
        ("And God said,\t \u3000", "Let"),
        ("And God said\x1c", " Let"),
        ("And God said", " "),
        ("Amen", ".\n"),
    ]
    recorder = Recorder()
    lm.set_cache_hook(recorder)
    results = lm.loglikelihood(cases)
    out = []
    for (context, continuation), (ll, greedy) in zip(cases, results):
        c_ids, k_ids = encode(lm, context, continuation)
        out.append({"context": context, "continuation": continuation, "context_ids": c_ids,
                    "continuation_ids": k_ids, "loglikelihood": fx(ll), "is_greedy": bool(greedy)})
    return out


def check_model(lm):
    """The model as this transformers loads it gives the logits of models/falcon-mini/reference.json
    (written by make_fixtures.py, possibly with another transformers version)."""
    ref = json.loads((MODEL / "reference.json").read_text())
    with torch.no_grad():
        logits = lm.model(torch.tensor([ref["prompt_ids"]]))["logits"][0]
    diff = (logits - torch.tensor(ref["logits"])).abs().max().item()
    assert diff < 1e-3, diff
    return diff


def write_parquet():
    import pyarrow as pa
    import pyarrow.parquet as pq
    for name in ["arc/test", "truthfulqa/validation"]:
        table = pa.Table.from_pylist(read_jsonl(DATA / f"{name}.jsonl"))
        pq.write_table(table, DATA / f"{name}.parquet", compression="snappy")


def main():
    torch.set_num_threads(1)
    import transformers
    import tokenizers
    import datasets
    lm = lm_eval.models.get_model("hf-causal-experimental").create_from_arg_string(
        f"pretrained={MODEL},dtype=float32", {"batch_size": 1, "device": "cpu"})
    diff = check_model(lm)
    print(f"falcon-mini logits against reference.json: max |diff| {diff:.2e}", flush=True)
    reference = {
        "harness": {
            "repository": "https://github.com/EleutherAI/lm-evaluation-harness",
            "commit": HARNESS_COMMIT,
            "model": "hf-causal-experimental",
            "model_args": "pretrained=models/falcon-mini,dtype=float32",
            "batch_size": 1,
            "device": "cpu",
            "max_length": lm.max_length,
            "eot_token_id": lm.eot_token_id,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "datasets": datasets.__version__,
            "numpy": np.__version__,
            "max_abs_logit_diff_vs_models_reference": diff,
        },
        "encoding": encoding_cases(lm),
        "tasks": {},
    }
    for name, data, fewshot, shots, tasks in task_specs():
        entry = run_task(lm, name, data, fewshot, shots, tasks)
        reference["tasks"][name] = entry
        shown = {t: {k: round(v["value"], 4) for k, v in m.items()} for t, m in entry["metrics"].items()}
        print(name, shots, "shots:", shown, flush=True)
    text = json.dumps(reference, indent=1, ensure_ascii=False)
    (DATA / "reference.json").write_text(text + "\n", encoding="utf-8")
    write_parquet()
    n = sum(len(it["requests"]) for t in reference["tasks"].values() for it in t["items"])
    print(f"wrote {DATA / 'reference.json'} ({n} requests)")


if __name__ == "__main__":
    main()
