#!/usr/bin/env python3
"""Write a random PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) with the
shapes of a Falcon checkpoint's config.json, to measure merging speed and memory without training
one. Only numpy and safetensors are needed.

usage: bench/make-lora-adapter.py CHECKPOINT_DIR OUT_DIR [--r 64] [--alpha 16]
                                  [--modules query_key_value,dense,dense_h_to_4h,dense_4h_to_h]
                                  [--dtype f32|f16] [--seed 0]

lora_A is drawn from N(0, 1/fan_in) and lora_B from N(0, 0.02²/r), so that s·B·A is small next
to the base weights (as a trained adapter's is) but not zero (PEFT's initial lora_B is zero).
"""

import argparse
import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import save_file

MODULES = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def shapes(config):
    """(out_features, in_features) of each of Falcon's linear layers, from config.json."""
    hidden = config["hidden_size"]
    n_head = config.get("num_attention_heads", config.get("n_head"))
    head_dim = hidden // n_head
    if config.get("new_decoder_architecture", False):
        n_kv = config.get("num_kv_heads", config.get("n_head_kv"))
    elif config.get("multi_query", True):
        n_kv = 1
    else:
        n_kv = n_head
    ffn = config.get("ffn_hidden_size") or 4 * hidden
    return {
        "query_key_value": ((n_head + 2 * n_kv) * head_dim, hidden),
        "dense": (hidden, hidden),
        "dense_h_to_4h": (ffn, hidden),
        "dense_4h_to_h": (hidden, ffn),
    }


def module_path(name):
    return ("self_attention." if name in ("query_key_value", "dense") else "mlp.") + name


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint directory (only its config.json is read)")
    p.add_argument("out", help="adapter directory to write")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--modules", default=",".join(MODULES))
    p.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    cfg_path = os.path.join(a.checkpoint, "config.json")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot read {cfg_path}: {e}")
    modules = [m for m in a.modules.split(",") if m]
    shp = shapes(config)
    unknown = [m for m in modules if m not in shp]
    if unknown:
        print(f"error: --modules: {unknown[0]} is not one of {', '.join(MODULES)}", file=sys.stderr)
        sys.exit(2)

    dtype = np.float32 if a.dtype == "f32" else np.float16
    rng = np.random.default_rng(a.seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for m in modules:
            out_f, in_f = shp[m]
            key = f"base_model.model.transformer.h.{layer}.{module_path(m)}"
            A = rng.standard_normal((a.r, in_f), dtype=np.float32) / math.sqrt(in_f)
            B = rng.standard_normal((out_f, a.r), dtype=np.float32) * (0.02 / math.sqrt(a.r))
            tensors[f"{key}.lora_A.weight"] = A.astype(dtype)
            tensors[f"{key}.lora_B.weight"] = B.astype(dtype)

    os.makedirs(a.out, exist_ok=True)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.basename(os.path.abspath(a.checkpoint)),
        "r": a.r,
        "lora_alpha": a.alpha,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
    }
    # Written to temporary names and renamed, so a run stopped midway leaves no adapter.
    st = os.path.join(a.out, "adapter_model.safetensors")
    save_file(tensors, st + ".tmp")
    with open(os.path.join(a.out, "adapter_config.json.tmp"), "w") as f:
        json.dump(adapter_config, f, indent=2)
    os.replace(st + ".tmp", st)
    os.replace(os.path.join(a.out, "adapter_config.json.tmp"),
               os.path.join(a.out, "adapter_config.json"))
    n = sum(t.size for t in tensors.values())
    print(f"wrote {a.out}: {len(tensors) // 2} lora pairs, r={a.r}, {n / 1e6:.1f} M parameters, "
          f"{os.path.getsize(st) / 1e6:.1f} MB ({a.dtype})")


if __name__ == "__main__":
    main()
