#!/usr/bin/env python3
"""Build the small Falcon checkpoints under models/.

Every checkpoint is written by transformers' own FalconForCausalLM.save_pretrained
(bf16 safetensors), in the directory layout that real Falcon checkpoints on the
Hugging Face Hub have, together with a reference.json holding transformers' float32
logits and greedy continuation for one prompt. See models/README.md.

Usage:
    python3 -m pip install torch transformers tokenizers safetensors peft
    apt-get install bible-kjv          # the `bible` program and the KJV text
    python3 models/make_fixtures.py

The script is deterministic: fixed seeds, a fixed number of training steps, and one
CPU thread (so that float sums are always taken in the same order).

The PEFT LoRA adapters (lora-*) are made on top of the committed base checkpoints with
`peft` and need neither `bible` nor a rebuild of the bases:
    python3 -m pip install peft
    python3 models/make_fixtures.py lora-tiny-7b-all lora-tiny-40b-patterns   # or: lora
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import safetensors
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tk_models
from transformers import AutoTokenizer, FalconConfig, FalconForCausalLM

from make_chat_fixtures import add_checkpoint_template

HERE = Path(__file__).resolve().parent

# Falcon's special tokens, ids 0..11, in Falcon's order; <|endoftext|> (11) is bos and eos.
SPECIAL_TOKENS = [
    ">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", ">>SUMMARY<<", ">>COMMENT<<",
    ">>ANSWER<<", ">>QUESTION<<", ">>DOMAIN<<", ">>PREFIX<<", ">>SUFFIX<<",
    ">>MIDDLE<<", "<|endoftext|>",
]
EOT = "<|endoftext|>"
EOT_ID = 11

# Books of the KJV kept out of all training (tokenizers and falcon-mini): heldout.txt.
HELDOUT_BOOKS = ["Ruth", "Jonah", "Philippians"]

TINY_VOCAB = 1024   # tokenizer shared by the random tiny-* checkpoints
MINI_VOCAB = 2048   # falcon-mini's own tokenizer

# falcon-mini training: a fixed number of steps (6 to 8 minutes on one core).
MINI_STEPS = 400
MINI_BATCH = 8
MINI_SEQ = 256
MINI_LR = 3e-3
MINI_WARMUP = 30

N_GREEDY = 32
MIN_GAP = 1e-2
SAFE_GAP = 2e-2
SIZE_LIMIT = 25 * 1024 * 1024

TINY_PROMPTS = [
    "Once upon a time, there were 3 bears.",
    "What is 12 + 345? It is 357.",
    "Hello world! This is a small test.",
    "And the king said unto his servants, Go ye up.",
    "A journey of a thousand miles begins with one step.",
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times.",
    "In 1611 the Bible was printed.",
]
MINI_PROMPTS = [
    "And it came to pass after these things, that the king said unto his servants,",
    "And the LORD spake unto Moses, saying, Speak unto the children of Israel,",
    "Then said Jesus unto his disciples, Verily I say unto you,",
    "In the beginning God created the heaven and the earth. And God said,",
    "Blessed are they that mourn: for they shall be comforted. Blessed are",
    "And David said to Saul, Let no man's heart fail because of him;",
    "The LORD is my shepherd; I shall not want. He maketh me to lie down",
    "And he went up from thence unto the house of the LORD, and",
]


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------
# Text: the King James Version from Debian's bible-kjv-text, read with its `bible` program.
# ----------------------------------------------------------------------------------------

def kjv_books():
    """Return [(book, text)] in canonical order. A chapter is its heading line
    ("Genesis 1") followed by its verses, one per line, without verse numbers;
    chapters are separated by a blank line."""
    bible = shutil.which("bible")
    if bible is None:
        sys.exit("the `bible` program is missing: apt-get install bible-kjv")
    out = subprocess.run(
        [bible, "-l100000", "Genesis1:1-Revelation22:21"],
        check=True, capture_output=True, text=True,
    ).stdout
    books = []  # [(name, [chapter lines])]
    chapter = None
    for line in out.split("\n"):
        if not line.strip():
            continue
        m = re.match(r"^\s+\d+ (.*)$", line)
        if m:
            chapter.append(m.group(1).strip())
            continue
        m = re.match(r"^(\S.*\S) (\d+)$", line)
        if not m:
            raise ValueError(f"unexpected line from bible: {line!r}")
        name = m.group(1)
        if not books or books[-1][0] != name:
            books.append((name, []))
        chapter = [line.strip()]
        books[-1][1].append(chapter)
    assert len(books) == 66, len(books)
    return [(name, "\n\n".join("\n".join(ch) for ch in chapters) + "\n") for name, chapters in books]


# ----------------------------------------------------------------------------------------
# Tokenizers: byte-level BPE with Falcon's pre-tokenizer and decoder.
# ----------------------------------------------------------------------------------------

def falcon_pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation("contiguous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), "isolated"),
    ])


def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(tk_models.BPE())
    tok.pre_tokenizer = falcon_pre_tokenizer()
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    # Written as Falcon's own tokenizer.json is: merges as "a b" strings, no "ignore_merges".
    j = json.loads(tok.to_str())
    j["model"].pop("ignore_merges", None)
    j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    for i, t in enumerate(SPECIAL_TOKENS):
        assert j["added_tokens"][i]["id"] == i and j["added_tokens"][i]["content"] == t
    text = json.dumps(j, ensure_ascii=False, indent=2) + "\n"
    tok2 = Tokenizer.from_str(text)
    probe = "And God said, Let there be light: 12345 times!\n  \tcafé ☃ <|endoftext|>"
    assert tok2.encode(probe).ids == tok.encode(probe).ids
    return tok2, text


def write_tokenizer(dirpath, tok_json, max_len):
    (dirpath / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    write_json(dirpath / "tokenizer_config.json", {
        "add_prefix_space": False,
        "eos_token": EOT,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    write_json(dirpath / "special_tokens_map.json", {
        "additional_special_tokens": SPECIAL_TOKENS[:-1],
        "eos_token": EOT,
    })


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------

def randomize(model, seed, out_gain=1.0, emb_std=0.2):
    """Non-degenerate random weights: LayerNorm weights 1 + 0.1*N(0,1), LayerNorm biases
    0.05*N(0,1), embeddings / lm_head N(0, emb_std) (logits with a std of about 3),
    query_key_value and dense_h_to_4h N(0, 1/fan_in) (unit-scale activations), the two
    output projections (self_attention.dense, dense_4h_to_h) out_gain times that: with tied
    embeddings a larger gain keeps each token's own embedding from dominating the residual
    stream (which makes greedy decoding repeat one token)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            n = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() == 1 and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * n)
            elif p.dim() == 1:
                p.copy_(0.05 * n)
            elif "word_embeddings" in name or name.startswith("lm_head"):
                p.copy_(emb_std * n)
            elif name.endswith("self_attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
                p.copy_(out_gain * n / math.sqrt(p.shape[1]))
            else:
                p.copy_(n / math.sqrt(p.shape[1]))


def save_checkpoint(model, dirpath, **kw):
    model = model.to(torch.bfloat16)
    model.save_pretrained(dirpath, **kw)
    for f in dirpath.glob("*.safetensors"):
        f.chmod(0o644)


def load_f32(dirpath):
    model = FalconForCausalLM.from_pretrained(dirpath, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    # Greedy continuation of exactly N_GREEDY tokens: never stop on eos.
    model.generation_config.eos_token_id = None
    return model


# ----------------------------------------------------------------------------------------
# reference.json
# ----------------------------------------------------------------------------------------

def top2_gaps(logits):
    top = torch.topk(logits.float(), 2, dim=-1).values
    return top[..., 0] - top[..., 1]


def reference_for(model, tok, prompt):
    ids = tok.encode(prompt, add_special_tokens=False).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0]  # [T, V]
        gen = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N_GREEDY,
            pad_token_id=EOT_ID, output_logits=True, return_dict_in_generate=True,
        )
        greedy = gen.sequences[0, len(ids):].tolist()
        assert len(greedy) == N_GREEDY, len(greedy)
        step_logits = torch.stack([l[0] for l in gen.logits])  # [N_GREEDY, V]
        assert step_logits.argmax(-1).tolist() == greedy
        # The same continuation without the KV cache: one forward pass over everything.
        full = model(input_ids=gen.sequences[:, :-1]).logits[0]
        assert full[len(ids) - 1:].argmax(-1).tolist() == greedy
    gap = min(top2_gaps(logits).min().item(), top2_gaps(step_logits).min().item(),
              top2_gaps(full).min().item())
    return {
        "prompt": prompt,
        "prompt_ids": ids,
        "logits": logits,
        "greedy_ids": greedy,
        "greedy_text": tok.decode(greedy, skip_special_tokens=False),
        "min_top2_gap": gap,
    }


def usable(ref):
    return 8 <= len(ref["prompt_ids"]) <= 24 and ref["min_top2_gap"] >= MIN_GAP


def choose(cands, name, prefer_varied, safe_gap=SAFE_GAP):
    """cands: [(key, ref)]. Keep those with 8..24 prompt tokens and a top-2 gap of at least
    MIN_GAP, and among them, where there are any, those with a gap of at least SAFE_GAP.
    Then the first one (prefer_varied=False) or the one whose greedy continuation has the
    most distinct tokens (random models easily fall into repeating one token)."""
    ok = [c for c in cands if usable(c[1])]
    if not ok:
        raise SystemExit(f"{name}: no candidate has a top-2 gap >= {MIN_GAP}: "
                         f"{[(k, len(r['prompt_ids']), r['min_top2_gap']) for k, r in cands]}")
    safe = [c for c in ok if c[1]["min_top2_gap"] >= safe_gap]
    ok = safe or ok
    if not prefer_varied:
        return ok[0]
    return max(ok, key=lambda c: (len(set(c[1]["greedy_ids"])), c[1]["min_top2_gap"]))


def r7(x):
    return float(f"{x:.7g}")


def write_reference(dirpath, ref, extra=()):
    """`extra`: (key, value) pairs written after the common fields (the adapters' base
    fixture and peft's version); the base fixtures have none."""
    rows = ref["logits"].tolist()
    parts = [
        "{",
        f'  "prompt": {json.dumps(ref["prompt"], ensure_ascii=False)},',
        f'  "prompt_ids": {json.dumps(ref["prompt_ids"])},',
        '  "logits": [',
        ",\n".join("    " + json.dumps([r7(v) for v in row], separators=(",", ":")) for row in rows),
        "  ],",
        f'  "greedy_ids": {json.dumps(ref["greedy_ids"])},',
        f'  "greedy_text": {json.dumps(ref["greedy_text"], ensure_ascii=False)},',
        f'  "min_top2_gap": {json.dumps(r7(ref["min_top2_gap"]))},',
        f'  "transformers_version": {json.dumps(transformers.__version__)},',
        f'  "torch_version": {json.dumps(torch.__version__)}',
    ]
    for k, v in extra:
        parts[-1] += ","
        parts.append(f'  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}')
    parts.append("}")
    (dirpath / "reference.json").write_text("\n".join(parts) + "\n", encoding="utf-8")
    back = json.loads((dirpath / "reference.json").read_text(encoding="utf-8"))
    assert len(back["logits"]) == len(back["prompt_ids"])


# ----------------------------------------------------------------------------------------
# Checks: configs read back, tensor names, dtypes and shapes
# ----------------------------------------------------------------------------------------

def expected_tensors(hidden, vocab, layers, n_head, n_kv, ffn, new_arch, parallel, tied, bias):
    hd = hidden // n_head
    want = {"transformer.word_embeddings.weight": [vocab, hidden],
            "transformer.ln_f.weight": [hidden], "transformer.ln_f.bias": [hidden]}
    if not tied:
        want["lm_head.weight"] = [vocab, hidden]
    for i in range(layers):
        p = f"transformer.h.{i}."
        lin = {"self_attention.query_key_value": [(n_head + 2 * n_kv) * hd, hidden],
               "self_attention.dense": [hidden, hidden],
               "mlp.dense_h_to_4h": [ffn, hidden],
               "mlp.dense_4h_to_h": [hidden, ffn]}
        for k, s in lin.items():
            want[p + k + ".weight"] = s
            if bias:
                want[p + k + ".bias"] = [s[0]]
        lns = ["ln_attn", "ln_mlp"] if new_arch else (
            ["input_layernorm"] if parallel else ["input_layernorm", "post_attention_layernorm"])
        for ln in lns:
            want[p + ln + ".weight"] = [hidden]
            want[p + ln + ".bias"] = [hidden]
    return want


def stored_tensors(dirpath):
    """{name: (dtype, shape)} over model.safetensors or the shards of the index."""
    index = dirpath / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, ["model.safetensors"]
    found = {}
    for f in files:
        with safe_open(dirpath / f, "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                assert k not in found, k
                found[k] = (sl.get_dtype(), list(sl.get_shape()))
                if weight_map is not None:
                    assert weight_map[k] == f, (k, f)
    if weight_map is not None:
        assert set(weight_map) == set(found)
    return found, files


def check_hf_checkpoint(dirpath):
    cfg = json.loads((dirpath / "config.json").read_text())
    new_arch = cfg["new_decoder_architecture"]
    n_kv = cfg["num_kv_heads"] if new_arch else (1 if cfg["multi_query"] else cfg["num_attention_heads"])
    want = expected_tensors(cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"],
                            cfg["num_attention_heads"], n_kv, cfg["ffn_hidden_size"], new_arch,
                            cfg["parallel_attn"], cfg["tie_word_embeddings"], cfg["bias"])
    return check_tensors(dirpath, want, cfg["vocab_size"])


def check_legacy_checkpoint(dirpath):
    cfg = json.loads((dirpath / "config.json").read_text())
    assert cfg["model_type"] == "RefinedWeb" and "new_decoder_architecture" not in cfg
    h = cfg["hidden_size"]
    want = expected_tensors(h, cfg["vocab_size"], cfg["n_layer"], cfg["n_head"], cfg["n_head_kv"],
                            4 * h, True, True, cfg["tie_word_embeddings"], cfg["bias"])
    return check_tensors(dirpath, want, cfg["vocab_size"])


def check_tensors(dirpath, want, vocab):
    found, files = stored_tensors(dirpath)
    assert set(found) == set(want), (sorted(set(found) ^ set(want)))
    for k, (dt, shape) in found.items():
        assert dt == "BF16", (k, dt)
        assert shape == want[k], (k, shape, want[k])
    tok = Tokenizer.from_file(str(dirpath / "tokenizer.json"))
    assert tok.get_vocab_size() == vocab
    return files


def to_falcon_config(legacy):
    """A legacy RW config as transformers' convert_custom_code_checkpoint.py rewrites it."""
    c = {k: v for k, v in legacy.items() if k not in ("auto_map", "architectures", "model_type")}
    c["num_attention_heads"] = c.pop("n_head")
    c["num_hidden_layers"] = c.pop("n_layer")
    if "n_head_kv" in c:
        c["num_kv_heads"] = c.pop("n_head_kv")
        c["new_decoder_architecture"] = True
    else:
        c["new_decoder_architecture"] = False
    c.pop("torch_dtype", None)
    return FalconConfig(**c)


# ----------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------

def fresh_dir(name):
    d = HERE / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def build_random(cfg, seed, out_gain):
    torch.manual_seed(seed)
    model = FalconForCausalLM._from_config(cfg, attn_implementation="eager")
    randomize(model, seed, out_gain)
    return model


def make_random(name, cfg, seeds, out_gain, tok, tok_json, save_kw=None, safe_gap=SAFE_GAP):
    # Pick seed and prompt on the bf16-rounded weights in memory ...
    cands = []
    for seed in seeds:
        model = build_random(cfg, seed, out_gain).to(torch.bfloat16).to(torch.float32).eval()
        model.generation_config.eos_token_id = None
        for prompt in TINY_PROMPTS:
            cands.append(((seed, prompt), reference_for(model, tok, prompt)))
    (seed, prompt), cand = choose(cands, name, prefer_varied=True, safe_gap=safe_gap)
    # ... then save that model and take the reference from the saved checkpoint.
    d = fresh_dir(name)
    save_checkpoint(build_random(cfg, seed, out_gain), d, **(save_kw or {}))
    write_tokenizer(d, tok_json, cfg.max_position_embeddings)
    ref = reference_for(load_f32(d), tok, prompt)
    assert ref["greedy_ids"] == cand["greedy_ids"] and usable(ref), name
    write_reference(d, ref)
    return d, ref, seed


def make_legacy(src, name):
    """The weights of `src` (a new-decoder-architecture checkpoint) under a config.json
    with the keys of tiiuae/falcon-40b's original RefinedWeb config.json."""
    d = fresh_dir(name)
    for f in sorted(src.iterdir()):
        if f.name.endswith(".safetensors") or f.name in (
                "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "reference.json"):
            shutil.copyfile(f, d / f.name)
    hf = json.loads((src / "config.json").read_text())
    assert hf["new_decoder_architecture"] and hf["parallel_attn"]
    assert hf["ffn_hidden_size"] == 4 * hf["hidden_size"]
    legacy = {
        "alibi": hf["alibi"],
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["RWForCausalLM"],
        "attention_dropout": hf["attention_dropout"],
        "auto_map": {
            "AutoConfig": "configuration_RW.RWConfig",
            "AutoModelForCausalLM": "modelling_RW.RWForCausalLM",
        },
        "bias": hf["bias"],
        "bos_token_id": hf["bos_token_id"],
        "eos_token_id": hf["eos_token_id"],
        "hidden_dropout": hf["hidden_dropout"],
        "hidden_size": hf["hidden_size"],
        "initializer_range": hf["initializer_range"],
        "layer_norm_epsilon": hf["layer_norm_epsilon"],
        "model_type": "RefinedWeb",
        "n_head": hf["num_attention_heads"],
        "n_head_kv": hf["num_kv_heads"],
        "n_layer": hf["num_hidden_layers"],
        "parallel_attn": True,
        # Not in falcon-40b's file (whose lm_head is tied); needed here since this lm_head is not.
        "tie_word_embeddings": hf["tie_word_embeddings"],
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": hf["vocab_size"],
    }
    write_json(d / "config.json", legacy)
    # The legacy config, read the way transformers converts such checkpoints, gives the
    # same model: same logits as the reference of `src`.
    cfg = to_falcon_config(json.loads((d / "config.json").read_text()))
    model = FalconForCausalLM.from_pretrained(d, config=cfg, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    ref = json.loads((d / "reference.json").read_text())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ref["prompt_ids"]])).logits[0]
    err = (logits - torch.tensor(ref["logits"])).abs().max().item()
    assert err < 1e-4, err
    return d


def train_mini(cfg, ids, seed):
    torch.manual_seed(seed)
    model = FalconForCausalLM._from_config(cfg, attn_implementation="eager")
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=MINI_LR, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    for step in range(MINI_STEPS):
        lr = MINI_LR * min(1.0, (step + 1) / MINI_WARMUP)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / MINI_STEPS))
        for pg in opt.param_groups:
            pg["lr"] = lr
        starts = torch.randint(0, len(ids) - MINI_SEQ, (MINI_BATCH,), generator=g).tolist()
        x = torch.stack([ids[s:s + MINI_SEQ] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == MINI_STEPS - 1:
            log(f"  step {step:4d}  loss {loss.item():.3f}  lr {lr:.2e}  {time.time() - t0:6.1f}s")
    model.eval()
    return model, time.time() - t0


def perplexity(model, ids, ctx):
    """Non-overlapping windows of `ctx` tokens (no BOS added); 'all' scores every token of
    a window but its first, 'second_half' only the tokens ctx/2+1 .. ctx-1 of each window."""
    nll_all, n_all, nll_half, n_half = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - ctx + 1, ctx):
            x = ids[s:s + ctx].unsqueeze(0)
            logp = F.log_softmax(model(input_ids=x).logits[0].double(), -1)
            tok_nll = -logp[:-1].gather(1, x[0, 1:, None])[:, 0]
            nll_all += tok_nll.sum().item()
            n_all += tok_nll.numel()
            nll_half += tok_nll[ctx // 2:].sum().item()
            n_half += tok_nll[ctx // 2:].numel()
    return math.exp(nll_all / n_all), math.exp(nll_half / n_half), len(ids) // ctx


# ----------------------------------------------------------------------------------------
# PEFT LoRA adapters on the committed base checkpoints
# ----------------------------------------------------------------------------------------

FALCON_LINEARS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]

# name, base fixture, LoraConfig arguments, dtype of the saved tensors, seeds tried.
ADAPTERS = [
    # Falcon-7B layout (multi-query: QKV rows need no regrouping), every linear layer.
    ("lora-tiny-7b-all", "tiny-7b-style",
     dict(r=8, lora_alpha=16, target_modules=FALCON_LINEARS),
     torch.float32, range(700, 716)),
    # rsLoRA: scale lora_alpha / sqrt(r) = 2 instead of lora_alpha / r = 0.5; two module
    # kinds on layers 0 and 2 only.
    ("lora-tiny-7b-rslora", "tiny-7b-style",
     dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["query_key_value", "dense_4h_to_h"],
          layers_to_transform=[0, 2]),
     torch.float32, range(720, 736)),
    # Falcon-40B layout (grouped KV: lora_B's QKV rows must be regrouped like the base's).
    ("lora-tiny-40b-all", "tiny-40b-style",
     dict(r=8, lora_alpha=16, target_modules=FALCON_LINEARS),
     torch.float32, range(400, 416)),
    # target_modules as a regex, per-module ranks and alphas, and a full lm_head replacement
    # (modules_to_save). Saved in bf16. The first pattern key that matches a module wins, in
    # the order of the keys in adapter_config.json, which save_pretrained sorts: the keys are
    # chosen so that sorting keeps the intended order (layer 1's dense_h_to_4h has rank 2,
    # layer 0's rank 12; layer 0's dense_4h_to_h has alpha 20, layer 1's alpha 5).
    ("lora-tiny-40b-patterns", "tiny-40b-style",
     dict(r=4, lora_alpha=8,
          target_modules=r".*\.(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)",
          rank_pattern={"h.1.mlp.dense_h_to_4h": 2, "mlp.dense_h_to_4h": 12, "query_key_value": 6},
          alpha_pattern={"dense": 3, r"h\.0\.mlp\.dense_4h_to_h": 20, "mlp.dense_4h_to_h": 5},
          modules_to_save=["lm_head"]),
     torch.bfloat16, range(420, 436)),
]

# The adapter's contribution s·B·A is drawn with a standard deviation of LORA_RHO times the
# standard deviation of the base weight it adds to, whatever the module's scale s.
LORA_RHO = 0.5
# modules_to_save copies: base + N(0, (LM_HEAD_RHO · std of the base)²).
LM_HEAD_RHO = 0.5


def randomize_adapter(pm, seed, dtype):
    """PEFT initialises lora_B to zero (the adapter does nothing). Draw A ~ N(0, 1/fan_in)
    and B ~ N(0, k²/r) with k chosen so that s·B·A has LORA_RHO times the spread of the
    base weight; values are rounded to `dtype` (what is saved)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    g = torch.Generator().manual_seed(seed)
    rnd = lambda shape: torch.randn(shape, generator=g, dtype=torch.float32)
    with torch.no_grad():
        for name, mod in sorted(pm.named_modules(), key=lambda nm: nm[0]):
            if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                r, fan_in = a.shape
                k = LORA_RHO * mod.get_base_layer().weight.float().std().item() * math.sqrt(fan_in) \
                    / mod.scaling["default"]
                a.copy_((rnd(a.shape) / math.sqrt(fan_in)).to(dtype).float())
                b.copy_((k * rnd(b.shape) / math.sqrt(r)).to(dtype).float())
            elif isinstance(mod, ModulesToSaveWrapper):
                w = mod.modules_to_save["default"].weight
                w.copy_((w + LM_HEAD_RHO * w.std() * rnd(w.shape)).to(dtype).float())


def adapter_model(base_dir, config, seed, dtype):
    from peft import LoraConfig, get_peft_model

    for k in ("rank_pattern", "alpha_pattern"):
        # Created in this order, loaded back in sorted order: they must agree.
        assert list(config.get(k, {})) == sorted(config.get(k, {})), k

    model = load_f32(base_dir)
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **config))
    # What a real adapter records is the Hub id of its base; here, the fixture's name.
    pm.peft_config["default"].base_model_name_or_path = base_dir.name
    randomize_adapter(pm, seed, dtype)
    return pm.eval()


def check_adapter_files(d, base_cfg, config, dtype):
    """The files as save_pretrained wrote them: the config read back, and every tensor a
    lora_A [r, in] / lora_B [out, r] pair of one of Falcon's linear layers (or the
    modules_to_save copy of lm_head), in `dtype`."""
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == config["r"], cfg
    for k in ("use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if k in config:
            assert cfg[k] == config[k], (k, cfg[k])
    h, ff = base_cfg.hidden_size, base_cfg.ffn_hidden_size
    n_kv = base_cfg.num_kv_heads if base_cfg.new_decoder_architecture else 1
    hd = h // base_cfg.num_attention_heads
    shapes = {"self_attention.query_key_value": (h, (base_cfg.num_attention_heads + 2 * n_kv) * hd),
              "self_attention.dense": (h, h), "mlp.dense_h_to_4h": (h, ff), "mlp.dense_4h_to_h": (ff, h)}
    found, _ = stored_tensors_of(d / "adapter_model.safetensors")
    want_dtype = {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
    pairs = 0
    for k, (dt, shape) in found.items():
        assert dt == want_dtype, (k, dt)
        if k == "base_model.model.lm_head.weight":
            assert config.get("modules_to_save") == ["lm_head"] and shape == [base_cfg.vocab_size, h]
            continue
        m = re.fullmatch(r"base_model\.model\.transformer\.h\.(\d+)\.(.*)\.lora_([AB])\.weight", k)
        assert m and m.group(2) in shapes, k
        fan_in, fan_out = shapes[m.group(2)]
        if m.group(3) == "A":
            assert shape[1] == fan_in and f"{k[:-len('A.weight')]}B.weight" in found, (k, shape)
            assert found[f"{k[:-len('A.weight')]}B.weight"][1] == [fan_out, shape[0]], k
            pairs += 1
    return pairs


def stored_tensors_of(path):
    found = {}
    with safe_open(path, "pt") as st:
        for k in st.keys():
            sl = st.get_slice(k)
            found[k] = (sl.get_dtype(), list(sl.get_shape()))
    return found, [path.name]


def make_adapter(name, base, config, dtype, seeds):
    import peft
    from peft import PeftModel

    base_dir = HERE / base
    base_ref = json.loads((base_dir / "reference.json").read_text())
    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    prompt = base_ref["prompt"]
    base_logits = torch.tensor(base_ref["logits"])

    # The base alone, in this environment, still gives its committed reference.
    base_model = load_f32(base_dir)
    with torch.no_grad():
        again = base_model(input_ids=torch.tensor([base_ref["prompt_ids"]])).logits[0]
    err = (again - base_logits).abs().max().item()
    assert err < 1e-4, (base, err)

    # Pick the seed with the widest top-2 margin among those whose greedy continuation
    # differs from the base's.
    cands = []
    for seed in seeds:
        ref = reference_for(adapter_model(base_dir, config, seed, dtype), tok, prompt)
        if ref["greedy_ids"] != base_ref["greedy_ids"]:
            cands.append((ref["min_top2_gap"], seed, ref))
    gap, seed, cand = max(cands, key=lambda c: (c[0], -c[1]))
    if gap < SAFE_GAP:
        raise SystemExit(f"{name}: no seed gives a top-2 gap >= {SAFE_GAP}: "
                         f"{[(s, round(g, 4)) for g, s, _ in cands]}")

    d = fresh_dir(name)
    pm = adapter_model(base_dir, config, seed, dtype)
    if dtype != torch.float32:
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.data = p.data.to(dtype)
    # No look-up of the base on the Hub for a changed vocabulary: there are no embeddings here.
    pm.save_pretrained(d, safe_serialization=True, save_embedding_layers=False)
    # save_pretrained also writes a model card template (README.md): not part of the adapter.
    (d / "README.md").unlink(missing_ok=True)
    for f in d.iterdir():
        f.chmod(0o644)
    assert sorted(f.name for f in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    pairs = check_adapter_files(d, FalconConfig.from_pretrained(base_dir), config, dtype)

    # The reference comes from the saved files, loaded as users load them, unmerged.
    loaded = PeftModel.from_pretrained(load_f32(base_dir), d).eval()
    ref = reference_for(loaded, tok, prompt)
    assert ref["greedy_ids"] == cand["greedy_ids"] and ref["min_top2_gap"] >= SAFE_GAP, name
    assert ref["prompt_ids"] == base_ref["prompt_ids"]
    changed = (ref["logits"] - base_logits).abs().max().item()
    # peft's own merge gives the same model.
    with torch.no_grad():
        merged = loaded.merge_and_unload()(input_ids=torch.tensor([ref["prompt_ids"]])).logits[0]
    assert (merged - ref["logits"]).abs().max().item() < 1e-3, name
    write_reference(d, ref, extra=[("base", base), ("peft_version", peft.__version__)])
    log(f"{name:24s} on {base}: seed {seed}, {pairs} lora pairs, logits moved by up to "
        f"{changed:.2f}, min gap {ref['min_top2_gap']:.4f}")
    log(f"{'':24s} greedy: {ref['greedy_text']!r}")
    return d


def make_adapters(only):
    from peft import __version__ as peft_version

    log(f"peft {peft_version}")
    for name, base, config, dtype, seeds in ADAPTERS:
        if not only or "lora" in only or name in only:
            make_adapter(name, base, config, dtype, seeds)


def main():
    # `make_fixtures.py tiny-40b-style tiny-legacy-rw` remakes only those fixtures.
    # peft keeps target_modules in a set, which adapter_config.json lists in Python's string
    # hash order: a fixed hash seed makes that order, and so the file, reproducible.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    # `make_fixtures.py lora` (or lora-… names) makes only adapters, on the committed bases.
    only = set(sys.argv[1:])
    want = lambda name: not only or name in only
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t_start = time.time()
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, safetensors {safetensors.__version__}")
    if only and all(n == "lora" or n.startswith("lora-") for n in only):
        make_adapters(only)
        check_size(t_start)
        return

    books = kjv_books()
    train_books = [(n, t) for n, t in books if n not in HELDOUT_BOOKS]
    heldout = "\n".join(t for n, t in books if n in HELDOUT_BOOKS)
    assert len(train_books) == 66 - len(HELDOUT_BOOKS)
    train_lines = [line for _, t in train_books for line in t.split("\n")]

    tiny_tok, tiny_tok_json = train_tokenizer(train_lines, TINY_VOCAB)
    mini_tok, mini_tok_json = train_tokenizer(train_lines, MINI_VOCAB)
    log(f"tokenizers trained: {TINY_VOCAB} and {MINI_VOCAB} tokens")

    summary = []

    # --- tiny-7b-style: multi-query, one LayerNorm, parallel attention, tied, no bias -----
    if want("tiny-7b-style"):
        cfg = FalconConfig(vocab_size=TINY_VOCAB, hidden_size=192, num_hidden_layers=3,
                           num_attention_heads=6, multi_query=True, new_decoder_architecture=False,
                           parallel_attn=True, bias=False, alibi=False, tie_word_embeddings=True)
        d, ref, _ = make_random("tiny-7b-style", cfg, [7, 8, 9], 6.0, tiny_tok, tiny_tok_json)
        # A checkpoint chat template; its renderings: python3 models/make_chat_fixtures.py
        add_checkpoint_template(d)
        summary.append((d, ref))

    # --- tiny-40b-style: grouped KV (8 over 2), ln_attn + ln_mlp, untied, 3+ shards -------
    if want("tiny-40b-style") or want("tiny-legacy-rw"):
        cfg = FalconConfig(vocab_size=TINY_VOCAB, hidden_size=256, num_hidden_layers=2,
                           num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True,
                           parallel_attn=True, bias=False, alibi=False, tie_word_embeddings=False)
        # A wider margin than the others: its greedy run is also compared after 8-bit quantization.
        d40, ref, _ = make_random("tiny-40b-style", cfg, list(range(40, 56)), 1.0, tiny_tok, tiny_tok_json,
                                  {"max_shard_size": "1200KB"}, safe_gap=0.06)
        summary.append((d40, ref))

    # --- tiny-legacy-rw: the same weights under a RefinedWeb config.json ------------------
    if want("tiny-legacy-rw"):
        d = make_legacy(d40, "tiny-legacy-rw")
        summary.append((d, json.loads((d / "reference.json").read_text())))

    # --- tiny-k256: 7B-style with every matrix width a multiple of 256 --------------------
    if want("tiny-k256"):
        cfg = FalconConfig(vocab_size=TINY_VOCAB, hidden_size=256, num_hidden_layers=2,
                           num_attention_heads=8, ffn_hidden_size=1024, multi_query=True,
                           new_decoder_architecture=False, parallel_attn=True, bias=False,
                           alibi=False, tie_word_embeddings=True)
        d, ref, _ = make_random("tiny-k256", cfg, [256, 257, 258], 6.0, tiny_tok, tiny_tok_json)
        summary.append((d, ref))

    # --- falcon-mini: trained on the KJV --------------------------------------------------
    if want("falcon-mini"):
        d = fresh_dir("falcon-mini")
        (d / "heldout.txt").write_text(heldout, encoding="utf-8")
        ids = []
        for _, text in train_books:
            ids += mini_tok.encode(text, add_special_tokens=False).ids + [EOT_ID]
        ids = torch.tensor(ids)
        log(f"falcon-mini: {len(ids)} training tokens, {len(heldout)} bytes held out")
        cfg = FalconConfig(vocab_size=MINI_VOCAB, hidden_size=256, num_hidden_layers=4,
                           num_attention_heads=8, multi_query=True, new_decoder_architecture=False,
                           parallel_attn=True, bias=False, alibi=False, tie_word_embeddings=True,
                           max_position_embeddings=MINI_SEQ)
        model, train_s = train_mini(cfg, ids, 2048)
        save_checkpoint(model, d)
        write_tokenizer(d, mini_tok_json, MINI_SEQ)
        model = load_f32(d)
        _, ref = choose([(p, reference_for(model, mini_tok, p)) for p in MINI_PROMPTS],
                        "falcon-mini", prefer_varied=False)
        write_reference(d, ref)
        held_ids = torch.tensor(mini_tok.encode(heldout, add_special_tokens=False).ids)
        ppl_all, ppl_half, windows = perplexity(model, held_ids, MINI_SEQ)
        write_json(d / "perplexity.json", {
            "file": "heldout.txt",
            "tokens": len(held_ids),
            "ctx": MINI_SEQ,
            "windows": windows,
            "method": "non-overlapping windows of ctx tokens from the start of the file, no BOS "
                      "added; ppl_all scores every token of a window but its first, "
                      "ppl_second_half only tokens ctx/2+1 .. ctx-1 (as llama-perplexity does)",
            "ppl_all": round(ppl_all, 4),
            "ppl_second_half": round(ppl_half, 4),
            "dtype": "float32 (bf16 weights upcast)",
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        })
        summary.append((d, ref))

    # --- checks -----------------------------------------------------------------------------
    for d, ref in summary:
        if d.name == "tiny-legacy-rw":
            files = check_legacy_checkpoint(d)
            cfg = to_falcon_config(json.loads((d / "config.json").read_text()))
        else:
            files = check_hf_checkpoint(d)
            cfg = FalconConfig.from_pretrained(d)
            # the tokenizer files load in transformers and encode as `tokenizers` does
            at = AutoTokenizer.from_pretrained(d)
            assert at.encode(ref["prompt"], add_special_tokens=False) == ref["prompt_ids"]
        n_kv = cfg.num_kv_heads if cfg.new_decoder_architecture else (1 if cfg.multi_query else cfg.num_attention_heads)
        log(f"{d.name:15s} hidden {cfg.hidden_size} heads {cfg.num_attention_heads} kv {n_kv} "
            f"layers {cfg.num_hidden_layers} ffn {cfg.ffn_hidden_size} vocab {cfg.vocab_size} "
            f"{'tied' if cfg.tie_word_embeddings else 'untied'} shards {len(files)} "
            f"prompt {len(ref['prompt_ids'])} tok, min gap {ref['min_top2_gap']:.4f}")
        log(f"{'':15s} greedy: {ref['greedy_text']!r}")
    if want("falcon-mini"):
        log(f"falcon-mini: trained {train_s:.0f}s, held-out ppl {ppl_all:.3f} "
            f"(second halves {ppl_half:.3f}, {windows} windows of {MINI_SEQ})")

    if want("falcon-mini"):
        # lm-evaluation-harness's own results on falcon-mini (tests/data/eval/reference.json).
        # The harness of the leaderboard's commit needs an environment of its own (see
        # make_eval_reference.py); EVAL_HARNESS_PYTHON names its interpreter.
        harness_python = os.environ.get("EVAL_HARNESS_PYTHON", sys.executable)
        subprocess.run([harness_python, str(HERE / "make_eval_reference.py")], check=True)

    if not only or any(n == "lora" or n.startswith("lora-") for n in only):
        make_adapters(only)
    check_size(t_start)


def check_size(t_start):
    total = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file())
    log(f"models/: {total / 2**20:.2f} MiB; done in {time.time() - t_start:.0f}s")
    assert total < SIZE_LIMIT, total


if __name__ == "__main__":
    main()
