#!/usr/bin/env python3
"""The cost of ggml's RPC layer when the network is free: `falcon-infer bench` on one GGUF with
every layer on the local CPU, against the same run with the layers split between the local CPU
and one `falcon-infer rpc-server` worker on loopback (same threads each), in one run. Also the
bytes that cross the network per generated and per prompt token, measured on the loopback
interface (less the bytes of loading the model, measured by a run that does almost nothing), and
as `falcon-infer plan` estimates them.

usage: bench/rpc-cost.py GGUF [--threads N] [--prompt N] [--gen N] [--reps N] [--split A,B]

Prints a Markdown table. Needs a release build (cargo build --release).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(ROOT, "target", "release", "falcon-infer")


def lo_bytes():
    """Bytes received on the loopback interface so far (each byte sent on lo is received once)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    raise SystemExit("no loopback interface in /proc/net/dev")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def bench(gguf, threads, prompt, gen, reps, rpc=None, split=None):
    cmd = [INFER, "bench", "-m", gguf, "-p", str(prompt), "-n", str(gen), "-r", str(reps),
           "--threads", str(threads), "--json"]
    if rpc:
        cmd += ["--rpc", rpc, "--tensor-split", split]
    before = lo_bytes()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout), lo_bytes() - before


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--split", default="1,1", help="local CPU share, worker share")
    a = ap.parse_args()

    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    worker = subprocess.Popen([INFER, "rpc-server", "--port", str(port), "--threads", str(a.threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("the worker did not start")
                time.sleep(0.1)
        local, _ = bench(a.gguf, a.threads, a.prompt, a.gen, a.reps)
        remote, _ = bench(a.gguf, a.threads, a.prompt, a.gen, a.reps, endpoint, a.split)
        # Network bytes: each run loads the model (its worker layers cross once); a run of one
        # prompt token and two generated ones measures that, the others add tokens to it.
        _, base = bench(a.gguf, a.threads, 1, 2, 1, endpoint, a.split)
        _, with_gen = bench(a.gguf, a.threads, 1, 2 + a.gen, 1, endpoint, a.split)
        _, with_prompt = bench(a.gguf, a.threads, 1 + a.prompt, 2, 1, endpoint, a.split)
        # bench evaluates the warm-up tokens and then each test once per repetition.
        per_gen = (with_gen - base) / a.gen
        per_prompt = (with_prompt - base) / a.prompt
    finally:
        worker.terminate()
        worker.wait()

    plan = json.loads(subprocess.run(
        [INFER, "plan", "-m", a.gguf, "--vram", "none", "--rpc-memory", "1TB", "--gpu-layers",
         str(remote["gpu_layers"]), "--json"], check=True, capture_output=True, text=True).stdout)
    est = plan.get("network") or {}

    def row(name, r):
        return (f"| {name} | {r['gpu_layers']} | {r['pp_tokens_per_s']['mean']:.2f} ± {r['pp_tokens_per_s']['std']:.2f} "
                f"| {r['tg_tokens_per_s']['mean']:.2f} ± {r['tg_tokens_per_s']['std']:.2f} |")

    print(f"{os.path.basename(a.gguf)}, {a.threads} threads per process, pp{a.prompt}, tg{a.gen}, {a.reps} repetitions")
    print()
    print("| run | layers on the worker | prompt tokens/s | generated tokens/s |")
    print("|---|---:|---:|---:|")
    print(row("local CPU only", local))
    print(row(f"local CPU + loopback worker (--tensor-split {a.split})", remote))
    print()
    pp = remote["pp_tokens_per_s"]["mean"] / local["pp_tokens_per_s"]["mean"]
    tg = remote["tg_tokens_per_s"]["mean"] / local["tg_tokens_per_s"]["mean"]
    print(f"ratio RPC / local: prompt {pp:.2f}x, generation {tg:.2f}x")
    print(f"network per generated token: {per_gen / 1e3:.1f} kB measured on lo, "
          f"{est.get('per_generated_token', 0) / 1e3:.1f} kB estimated by plan")
    print(f"network per prompt token: {per_prompt / 1e3:.1f} kB measured on lo, "
          f"{est.get('per_prompt_token', 0) / 1e3:.1f} kB estimated by plan")


if __name__ == "__main__":
    sys.exit(main())
