"""Generates a LoRA adapter for the tiny chat model: peft's format, random weights, nothing downloaded.

The weights are seeded (every machine builds the same adapter) and large enough that greedy output with the
adapter differs from the base model's. Different seeds give different adapters.

Usage: python scripts/make_tiny_lora.py [--base models/tiny-chat] [--out models/tiny-chat-lora] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

RANK = 8
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHT_STD = 0.1  # with alpha/rank = 2, each layer's update is comparable to its base weights
VERSION = 1  # bump to force regeneration when the recipe changes


def write_adapter(base: pathlib.Path, out: pathlib.Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGET_MODULES, lora_dropout=0.0,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * WEIGHT_STD)
    peft_model.save_pretrained(out, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="models/tiny-chat")
    parser.add_argument("--out", default="models/tiny-chat-lora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    stamp = out / "tiny_lora_version.json"
    recipe = {"version": VERSION, "seed": args.seed}
    if not args.force and stamp.exists() and json.loads(stamp.read_text()) == recipe:
        print(f"tiny LoRA adapter already at {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_adapter(pathlib.Path(args.base), out, args.seed)
    stamp.write_text(json.dumps(recipe))
    print(f"tiny LoRA adapter (rank {RANK}, seed {args.seed}) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
