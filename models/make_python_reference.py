#!/usr/bin/env python3
"""What CPython prints for the parts of Python that lm-evaluation-harness's prompts and
few-shot draws depend on; written to tests/data/eval/python.json for the Rust ports in
src/eval/ (pyrandom.rs: `random.Random`; text.rs: `str.isspace`, `str.strip`,
`str.capitalize`; metrics.rs: numpy's mean).

    python3 models/make_python_reference.py

Needs numpy (for `np.mean`, the leaderboard's average over MMLU subjects). Deterministic.
"""

import json
import platform
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "eval" / "python.json"

SEEDS = [0, 1, 42, 1234, 2**32 - 1, 2**32, 2**32 + 5, 2**64 - 1, 12345678901234567890, -42]


def first_words():
    out = []
    for s in SEEDS:
        r = random.Random(s)
        out.append({"seed": str(s), "words": [r.getrandbits(32) for _ in range(8)]})
    return out


def getrandbits():
    r = random.Random(42)
    return [{"k": k, "value": str(r.getrandbits(k))}
            for k in [0, 1, 2, 7, 8, 31, 32, 33, 48, 63, 64, 1, 32, 64]]


def floats():
    r = random.Random(42)
    return [r.random().hex() for _ in range(6)]


def randbelow():
    r = random.Random(7)
    ns = [1, 2, 3, 5, 7, 8, 100, 1000, 2**31 + 1, 2**32, 3, 1]
    return [{"n": n, "value": r._randbelow(n)} for n in ns]


def shuffles():
    out = []
    for seed, n in [(42, 0), (42, 1), (42, 2), (42, 3), (42, 10), (42, 57), (1234, 57), (42, 1000)]:
        x = list(range(n))
        random.Random(seed).shuffle(x)
        out.append({"seed": seed, "n": n, "permutation": x})
    return out


def samples():
    out = []
    # (n, k): k <= 5 uses a 21-entry set size; k > 5 adds 4**ceil(log(3k, 4)). n at most that
    # size takes the pool branch, a larger n the set branch (with rejection of repeats).
    for seed, n, k in [(42, 5, 0), (42, 5, 3), (42, 5, 5), (42, 21, 3), (42, 22, 3),
                       (1234, 22, 5), (42, 28, 6), (42, 85, 6), (42, 86, 6), (42, 100, 3),
                       (42, 277, 25), (42, 278, 25), (1234, 5000, 10), (42, 40, 40),
                       (42, 1000, 26), (7, 3, 2)]:
        out.append({"seed": seed, "n": n, "k": k,
                    "sample": random.Random(seed).sample(range(n), k)})
    return out


def harness_stream():
    """One generator through a shuffle of the eval docs and then one draw per doc, as the
    harness's evaluator uses it (seed 42, 25 shots from 1119 training docs, 12 docs)."""
    r = random.Random()
    r.seed(42)
    docs = list(range(12))
    r.shuffle(docs)
    draws = [r.sample(range(1119), 25) for _ in docs]
    same_split = [r.sample(range(12), 4) for _ in range(3)]
    return {"shuffled": docs, "draws": draws, "same_split_draws": same_split}


def text():
    space = [c for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    # Characters whose str.capitalize() (titlecase) differs from str.upper().
    title = [{"c": c, "title": chr(c).capitalize(), "upper": chr(c).upper()}
             for c in range(sys.maxunicode + 1)
             if 0xD800 > c or c > 0xDFFF
             if chr(c).capitalize() != chr(c).upper()]
    cases = ["", "x", "he", "then he", "HELLO World", "ǆemal", "ǅ", "ßa", "ﬁne day", "ᾳb",
             "ΑΣ x", "ΣΑΣ", "aΣ", "ﬃ", "ŉ", "İstanbul", "ǰ", "აბ", " lead", "1st",
             "éCOLE", "ΐ", "ΆΣΣ."]
    caps = [{"s": s, "capitalize": s.capitalize()} for s in cases]
    strips = ["  x  ", "\t\n x \x1c\x1d\x1e\x1f\x85\xa0\u2028\u3000", "\u200bx\u200b", "\ufeffy",
              "a\u180e", " ", ""]
    return {
        "isspace": space,
        "titlecase_not_upper": title,
        "capitalize": caps,
        "strip": [{"s": s, "strip": s.strip(), "rstrip": s.rstrip()} for s in strips],
    }


def numpy_means():
    """np.mean of random.Random(n).random() * 10 ** (i % 7 - 3), i < n: numpy sums pairwise."""
    import numpy as np
    out = []
    for n in [1, 2, 5, 7, 8, 9, 15, 16, 17, 57, 128, 129, 200, 257, 1000]:
        r = random.Random(n)
        values = [r.random() * 10 ** (i % 7 - 3) for i in range(n)]
        out.append({"n": n, "mean": float(np.mean(np.array(values))).hex()})
    return out


def main():
    ref = {
        "python": platform.python_version(),
        "unicode": __import__("unicodedata").unidata_version,
        "random": {
            "first_words": first_words(),
            "getrandbits_seed42": getrandbits(),
            "random_seed42": floats(),
            "randbelow_seed7": randbelow(),
            "shuffle": shuffles(),
            "sample": samples(),
            "harness_stream": harness_stream(),
        },
        "text": text(),
        "numpy_mean": numpy_means(),
    }
    OUT.write_text(json.dumps(ref, ensure_ascii=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
