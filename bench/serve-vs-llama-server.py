#!/usr/bin/env python3
"""`falcon-infer serve` against llama.cpp's `llama-server`, in one run, on the same GGUF.

For each model and each concurrency (1, 4 and 16 clients by default), every client streams one
greedy completion of --tokens tokens from its own prompt through OpenAI's /v1/completions; the
script reports aggregate generated tokens per second (all tokens over the wall time of the
round; the median of --rounds rounds), and that round's p50 and p99 time to first token (TTFT)
and time per output token (TPOT, after the first). Both servers get the same file, --parallel, per-sequence context and threads; the
servers run one at a time. Ratios are falcon / llama-server (TTFT: llama-server / falcon, so
that above 1 is better for falcon too).

    bench/serve-vs-llama-server.py --falcon target/release/falcon-infer \
        --llama-server /path/to/llama-server --model /work/synth/falcon-7b.q4_0.gguf \
        --model models/falcon-mini.q4_0.gguf --threads 2

Only the Python standard library is needed; everything runs on 127.0.0.1.
"""

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

PROMPT_WORDS = (
    "the falcon flew over the river and the hills where the shepherds kept their flocks by night "
    "and the wind carried the sound of bells from the city walls to the fields beyond"
).split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_for(i):
    words = PROMPT_WORDS[i % len(PROMPT_WORDS):] + PROMPT_WORDS[: i % len(PROMPT_WORDS)]
    return f"Story {i}: " + " ".join(words[:20])


def wait_ready(port, proc, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            r = c.getresponse()
            r.read()
            if r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def stream_one(port, prompt, tokens, out, idx):
    body = json.dumps({
        "model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    })
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}: {r.read()[:300]!r}")
    times, usage = [], None
    for raw in r:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            usage = ev["usage"].get("completion_tokens")
        if ev.get("choices") and ev["choices"][0].get("text"):
            times.append(time.perf_counter())
    end = time.perf_counter()
    n = usage if usage is not None else len(times)
    ttft = (times[0] - t0) if times else end - t0
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    out[idx] = (n, ttft, tpot, end)


def round_(port, clients, tokens):
    out = [None] * clients
    threads = [threading.Thread(target=stream_one, args=(port, prompt_for(i), tokens, out, i))
               for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(o[3] for o in out) - start
    total = sum(o[0] for o in out)
    ttfts = sorted(o[1] for o in out)
    tpots = sorted(o[2] for o in out if o[2] is not None)
    return {
        "tokens": total,
        "tok_s": total / wall,
        "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
        "tpot_p50": pct(tpots, 50) if tpots else float("nan"),
        "tpot_p99": pct(tpots, 99) if tpots else float("nan"),
    }


def pct(xs, p):
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def start_server(kind, args, model, port):
    ctx = args.ctx_size
    if kind == "falcon":
        cmd = [args.falcon, "serve", "-m", model, "--port", str(port), "--threads",
               str(args.threads), "--parallel", str(args.parallel), "--ctx-size", str(ctx)]
    else:
        # llama-server divides -c among its slots: give each slot the same context as ours.
        cmd = [args.llama_server, "-m", model, "--port", str(port), "-t", str(args.threads),
               "-tb", str(args.threads), "-np", str(args.parallel), "-c",
               str(ctx * args.parallel), "--no-webui", "-ngl", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
    except BaseException:
        proc.kill()
        raise
    return proc


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(kind, args, model):
    """Each concurrency --rounds times: the median round's aggregate, percentiles over all."""
    port = free_port()
    proc = start_server(kind, args, model, port)
    try:
        round_(port, 1, 8)  # warm-up
        out = {}
        for c in args.clients:
            rounds = [round_(port, c, args.tokens) for _ in range(args.rounds)]
            med = sorted(rounds, key=lambda r: r["tok_s"])[len(rounds) // 2]
            out[c] = dict(med, rounds=[r["tok_s"] for r in rounds])
        return out
    finally:
        stop(proc)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--falcon", default="target/release/falcon-infer")
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model", action="append", required=True, help="GGUF (repeatable)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--ctx-size", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per concurrency (median)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    results = {}
    for model in args.model:
        name = re.sub(r"\.gguf$", "", os.path.basename(model))
        f = measure("falcon", args, model)
        l = measure("llama-server", args, model)
        results[name] = {"falcon": f, "llama-server": l}
        print(f"\n{name}: --parallel {args.parallel}, {args.ctx_size} tokens per sequence, "
              f"{args.threads} threads, {args.tokens} tokens per client")
        print(f"{'clients':>7} {'server':>13} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'TPOT p50':>9} {'TPOT p99':>9}")
        for c in args.clients:
            for kind, r in (("falcon", f[c]), ("llama-server", l[c])):
                print(f"{c:>7} {kind:>13} {r['tok_s']:8.1f} {r['ttft_p50']*1e3:8.0f}ms "
                      f"{r['ttft_p99']*1e3:8.0f}ms {r['tpot_p50']*1e3:8.1f}ms "
                      f"{r['tpot_p99']*1e3:8.1f}ms")
            print(f"{c:>7} {'ratio':>13} {f[c]['tok_s'] / l[c]['tok_s']:7.2f}x "
                  f"TTFT p99 {l[c]['ttft_p99'] / f[c]['ttft_p99']:.2f}x")
        if 1 in f and max(args.clients) > 1:
            top = max(args.clients)
            print(f"falcon: {top} clients give {f[top]['tok_s'] / f[1]['tok_s']:.2f}x the "
                  f"one-client aggregate (llama-server: {l[top]['tok_s'] / l[1]['tok_s']:.2f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
