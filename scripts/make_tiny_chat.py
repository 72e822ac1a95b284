"""Generates the embedded tiny chat model: a random-weight Qwen2 with a real byte-level BPE tokenizer.

Nothing is downloaded: the tokenizer is trained here on text shipped with Python itself, the weights
are random (seeded, so every machine builds the same model). head_dim is 64 because vLLM's CPU
attention kernels reject smaller heads.

Usage: python scripts/make_tiny_chat.py [--out models/tiny-chat] [--force]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import sysconfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The ChatML template that Qwen2 models use (without tool calling).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_SIZE = 4096
MAX_CONTEXT = 2048
VERSION = 1  # bump to force regeneration when the recipe changes


def training_corpus(limit_bytes: int = 8_000_000) -> list[str]:
    """English-ish text with code: the standard library's own sources, read in a fixed order."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        size += len(text)
        if size > limit_bytes:
            break
    return texts


def train_tokenizer(out: pathlib.Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=MAX_CONTEXT,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def write_model(out: pathlib.Path, tokenizer) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim = 128 / 2 = 64
        num_key_value_heads=2,
        max_position_embeddings=MAX_CONTEXT,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/tiny-chat")
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    stamp = out / "tiny_chat_version.json"
    if not args.force and stamp.exists() and json.loads(stamp.read_text()).get("version") == VERSION:
        print(f"tiny chat model already at {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out)
    write_model(out, tokenizer)
    stamp.write_text(json.dumps({"version": VERSION}))
    print(f"tiny chat model written to {out} (vocab {len(tokenizer)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
