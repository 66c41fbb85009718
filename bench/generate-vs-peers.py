#!/usr/bin/env python3
"""Generation speed of falcon-infer against the peers users run, in one run, same threads:
llama-cpp-python on the same GGUF file, and transformers on the bf16 checkpoint on the CPU
(the Falcon model card's way).

usage: bench/generate-vs-peers.py GGUF CHECKPOINT_DIR [--threads N] [--tokens N] [--hf-tokens N]

Needs `pip install llama-cpp-python torch transformers` and a release build of falcon-infer.
Make the inputs with `falcon-quantize synth --shape falcon-7b -o ck` and
`falcon-quantize ck -o ck.q4_0.gguf --type q4_0`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The falcon is a bird of prey that"


def ours(gguf, threads, n, reps):
    out = subprocess.run(
        [os.path.join(ROOT, "target/release/falcon-infer"), "bench", "--model", gguf, "--threads", str(threads),
         "-p", "16", "-n", str(n), "-r", str(reps), "--json"],
        check=True, capture_output=True, text=True).stdout
    doc = json.loads(out)
    return doc


def llama_cpp_python(gguf, threads, n, reps):
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_gpu_layers=0,
                verbose=False, seed=0)
    tokens = llm.tokenize(PROMPT.encode())
    rates = []
    for _ in range(reps):
        llm.reset()
        llm.eval(tokens)
        t = time.perf_counter()
        for _ in range(n):
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
        rates.append(n / (time.perf_counter() - t))
    return rates


def transformers_cpu(ck, threads, n):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(ck)
    model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16)
    model.eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(n):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("checkpoint")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hf-tokens", type=int, default=8)
    a = ap.parse_args()
    doc = ours(a.gguf, a.threads, a.tokens, a.reps)
    print("falcon-infer bench:", json.dumps(doc), file=sys.stderr)
    lcp = llama_cpp_python(a.gguf, a.threads, a.tokens, a.reps)
    hf = transformers_cpu(a.checkpoint, a.threads, a.hf_tokens) if a.hf_tokens > 0 else float("nan")
    ours_mean = doc["tg_tokens_per_s"]["mean"]
    print(f"\nthreads {a.threads}, {a.tokens} generated tokens x {a.reps} repetitions")
    print(f"{'engine':32s} {'generation tokens/s':>20s}")
    print(f"{'falcon-infer':32s} {ours_mean:20.2f}")
    print(f"{'llama-cpp-python (same GGUF)':32s} {statistics.mean(lcp):20.2f}")
    print(f"{'transformers bf16 (checkpoint)':32s} {hf:20.2f}")
    print(f"falcon-infer's ceiling: {doc['tg_ceiling_tokens_per_s']:.2f} tokens/s at "
          f"{doc['copy_bandwidth'] / 1e9:.1f} GB/s copy bandwidth; reached {doc['fraction_of_ceiling'] * 100:.0f}%")
    print(f"\nfalcon-infer / llama-cpp-python: {ours_mean / statistics.mean(lcp):.3f}x")
    print(f"falcon-infer / transformers:     {ours_mean / hf:.1f}x")


if __name__ == "__main__":
    main()
