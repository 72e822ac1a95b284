"""Writes a random-weight model with Qwen2.5-1.5B's architecture around the tiny chat tokenizer.

Runs on the GPU device machine (no model hub there): hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, tied embeddings, bf16; vocab_size = the tokenizer's (4096), so the embedding matrix
is small and the parameter count is about 1.3B. Seeded, so every run writes the same weights.

Usage: python scripts/device/make_random_model.py --tokenizer DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

MAX_CONTEXT = 32768  # Qwen2.5-1.5B's max_position_embeddings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (scripts/make_tiny_chat.py)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        print(f"model already at {out}")
        return 0

    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    for f in pathlib.Path(args.tokenizer).iterdir():
        shutil.copy(f, out / f.name)
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["model_max_length"] = MAX_CONTEXT
    cfg_path.write_text(json.dumps(tok_cfg, indent=2))
    try:
        tokenizer = AutoTokenizer.from_pretrained(out)
    except Exception as e:  # noqa: BLE001 - a tokenizer_config written by a newer transformers
        print(f"AutoTokenizer failed ({type(e).__name__}: {e}); rebuilding the config from tokenizer.json")
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(out / "tokenizer.json"),
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            model_max_length=MAX_CONTEXT,
        )
        template = out / "chat_template.jinja"
        if template.exists():
            tokenizer.chat_template = template.read_text()
        tokenizer.save_pretrained(out)

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=MAX_CONTEXT,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        eos_token_id=eos,
        bos_token_id=pad,
        pad_token_id=pad,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad).save_pretrained(out)
    print(f"random Qwen2.5-1.5B-shaped model ({n_params / 1e9:.2f}B params, vocab {len(tokenizer)}) "
          f"written to {out} in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
