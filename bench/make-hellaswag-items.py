#!/usr/bin/env python3
"""Items in HellaSwag's format made from a plain text, for the evaluation benchmark.

usage: bench/make-hellaswag-items.py [TEXT] -o DIR [--items N] [--seed S]

TEXT is a file of one verse (or sentence) per line, lines of one or two words being headings
(default: models/falcon-mini/heldout.txt, Ruth, Jonah and Philippians, which falcon-mini never
saw in training). Each item takes the previous line as `ctx_a`, the first words of a line as
`ctx_b`, and the rest of that line as the right ending among three others: the rests of other
lines of the text, drawn with a seeded generator. `activity_label` is the heading (the book).

Writes DIR/validation.jsonl (the evaluated split: ctx_b of three words) and DIR/train.jsonl
(the few-shot split: the same lines cut after five words), one JSON object per line with
HellaSwag's fields (`ind`, `activity_label`, `ctx_a`, `ctx_b`, `ctx`, `endings`, `source_id`,
`split`, `split_type`, `label` as a digit string, as on the Hub). Lines too short to cut are
skipped; when the text has fewer usable lines than --items, lines are cut a second time
(after four words) until there are enough.
"""
import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_WORDS = 9  # a line needs a few words of context and a few of ending


def read_lines(path):
    """(heading, previous line, line) for every line of at least MIN_WORDS words."""
    out = []
    heading, prev = None, None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = " ".join(raw.split())
            if not line:
                continue
            words = line.split()
            if len(words) <= 2 and words[-1].isdigit():  # "Ruth 1": a heading
                heading, prev = words[0], None
                continue
            if prev is not None and len(words) >= MIN_WORDS and heading:
                out.append((heading, prev, line))
            prev = line
    return out


def lower_first(s):
    return s[:1].lower() + s[1:]


def make(lines, cut, rng, split, start_ind):
    """One item per line, its ending cut after `cut` words."""
    rests = [" ".join(l.split()[cut:]) for _, _, l in lines]
    items = []
    for i, (heading, prev, line) in enumerate(lines):
        words = line.split()
        ctx_b = lower_first(" ".join(words[:cut]))
        others = [j for j in range(len(lines)) if rests[j] != rests[i]]
        wrong = [rests[j] for j in rng.sample(others, 3)]
        label = rng.randrange(4)
        endings = wrong[:label] + [rests[i]] + wrong[label:]
        items.append({
            "ind": start_ind + len(items),
            "activity_label": heading,
            "ctx_a": prev,
            "ctx_b": ctx_b,
            "ctx": f"{prev} {ctx_b}",
            "endings": endings,
            "source_id": f"text-{split}-{i}-{cut}",
            "split": split,
            "split_type": "indomain",
            "label": str(label),
        })
    return items


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("text", nargs="?", default=os.path.join(ROOT, "models/falcon-mini/heldout.txt"))
    ap.add_argument("-o", "--out", required=True, help="directory to write the two splits into")
    ap.add_argument("--items", type=int, default=300, help="items in the validation split")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    lines = read_lines(a.text)
    if len(lines) < 4:
        sys.exit(f"{a.text}: only {len(lines)} lines of {MIN_WORDS}+ words after a first line; "
                 "give a longer text")
    rng = random.Random(a.seed)
    val = make(lines, 3, rng, "val", 0)
    cut = 4
    while len(val) < a.items and cut < MIN_WORDS - 2:
        val += make(lines, cut, rng, "val", len(val))
        cut += 1 if cut != 4 else 2  # 3, then 4, then 6: 5 is the few-shot split's cut
    val = val[:a.items]
    train = make(lines, 5, rng, "train", 0)
    os.makedirs(a.out, exist_ok=True)
    for name, items in [("validation", val), ("train", train)]:
        path = os.path.join(a.out, f"{name}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(it, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        print(f"wrote {path}: {len(items)} items", file=sys.stderr)


if __name__ == "__main__":
    main()
