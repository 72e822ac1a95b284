"""The planner knows the model: TP must split the attention and KV heads, PP cannot exceed the layers."""

from __future__ import annotations

import json

import pytest

from app import layout
from app.model_shape import ModelShape, read_model_shape, shape_from_config
from conftest import ROOT

QWEN25_7B = {"num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28}
LLAMA31_70B = {"num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80}


def test_qwen25_7b_takes_tp_1_2_4_28_and_not_3_or_8():
    shape = shape_from_config(QWEN25_7B)
    assert shape.valid_tp() == [1, 2, 4, 28]  # 7 and 14 split the 28 heads but not the 4 KV heads
    assert shape.problem(4, 2) is None
    message = shape.problem(3, 1)
    assert "28 attention heads" in message and "[1, 2, 4" in message
    assert "tensor_parallel_size 8 does not divide" in shape.problem(8, 1)  # 28 heads do not split 8 ways


def test_llama31_70b_on_two_nodes_of_eight():
    shape = shape_from_config(LLAMA31_70B)
    assert shape.problem(8, 2) is None and shape.problem(16, 1) is None
    assert "3" in shape.problem(3, 1) and shape.problem(8, 81) == (
        "pipeline_parallel_size 81 is more than the model's 80 layers; valid pipeline_parallel_size: 1 to 80")


def test_kv_heads_fewer_than_tp_are_replicated():
    shape = ModelShape(attention_heads=32, kv_heads=2, layers=4)
    assert shape.tp_fits(8) and not shape.tp_fits(3)


def test_the_tiny_chat_model_is_read_from_its_folder():
    shape = read_model_shape(str(ROOT / "models" / "tiny-chat"))
    assert shape == ModelShape(2, 2, 2)
    assert shape.problem(2, 2) is None
    assert "tensor_parallel_size 4 does not divide" in shape.problem(4, 1)
    assert "pipeline_parallel_size 3 is more than the model's 2 layers" in shape.problem(1, 3)


def test_unreadable_models_are_not_checked(tmp_path):
    assert read_model_shape(str(tmp_path)) is None
    assert read_model_shape("no-such-org/no-such-model") is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    assert read_model_shape(str(tmp_path)) is None


def test_multimodal_configs_use_their_text_config():
    assert shape_from_config({"text_config": QWEN25_7B}) == ModelShape(28, 4, 28)


@pytest.mark.parametrize(("tp", "code"), [(3, 2), (4, 0)])
def test_cli_checks_the_model(tmp_path, capsys, tp, code):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    assert layout.main(["--nodes", "2", "--gpus-per-node", "8", "--tp", str(tp), "--model", str(tmp_path)]) == code
    if code:
        assert "valid tensor_parallel_size" in capsys.readouterr().err
