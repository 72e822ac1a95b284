"""What a model's shape allows: tensor parallel must split its attention heads (and KV heads) evenly, pipeline
parallel cannot have more stages than layers. Read from the model's config.json at build time, so that a layout
vLLM would refuse fails before any placement group is reserved, naming the valid choices."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    attention_heads: int
    kv_heads: int
    layers: int

    def tp_fits(self, tp: int) -> bool:
        # vLLM shards the query heads; KV heads are sharded, or replicated when there are fewer than TP.
        kv_ok = self.kv_heads % tp == 0 if tp <= self.kv_heads else tp % self.kv_heads == 0
        return self.attention_heads % tp == 0 and kv_ok

    def valid_tp(self, limit: int = 64) -> list[int]:
        return [tp for tp in range(1, min(limit, self.attention_heads) + 1) if self.tp_fits(tp)]

    def problem(self, tp: int, pp: int) -> str | None:
        """Why TP x PP cannot run this model, naming the valid choices; None when it can."""
        if not self.tp_fits(tp):
            return (f"tensor_parallel_size {tp} does not divide the model's {self.attention_heads} attention heads "
                    f"and {self.kv_heads} KV heads evenly; valid tensor_parallel_size: {self.valid_tp()}")
        if pp > self.layers:
            return (f"pipeline_parallel_size {pp} is more than the model's {self.layers} layers; "
                    f"valid pipeline_parallel_size: 1 to {self.layers}")
        return None


def shape_from_config(config: dict) -> ModelShape | None:
    config = config.get("text_config", config)  # multimodal models keep the language model's shape here
    heads, layers = config.get("num_attention_heads"), config.get("num_hidden_layers")
    if not isinstance(heads, int) or not isinstance(layers, int):
        return None
    return ModelShape(heads, config.get("num_key_value_heads") or heads, layers)


def read_model_shape(source: str) -> ModelShape | None:
    """The shape of a local model folder, or of a hub model already in the local cache; None if unreadable."""
    path = pathlib.Path(source) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # noqa: BLE001 - not a hub id, or no hub library: nothing to check against
            return None
        if not isinstance(cached, str):
            return None
        path = pathlib.Path(cached)
    try:
        return shape_from_config(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
