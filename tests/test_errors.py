"""Bad input gives one clear line naming the file/tensor/key and what to do."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemmaforge
from gemmaforge import GemmaforgeError


@pytest.fixture
def saved(tmp_path):
    m = gemmaforge.load("tiny-gemma2")
    gemmaforge.save_pretrained(m, tmp_path / "m")
    return tmp_path / "m"


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(GemmaforgeError) as e:
        gemmaforge.load(tmp_path / "nope.gguf")
    assert "nope.gguf" in one_line(e)
    with pytest.raises(GemmaforgeError, match="does not exist"):
        gemmaforge.load(str(tmp_path / "nope"))


def test_unknown_preset():
    with pytest.raises(GemmaforgeError) as e:
        gemmaforge.load("gemma2-2c")
    assert "did you mean 'gemma2-2b'" in one_line(e)


def test_missing_config(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(GemmaforgeError, match="no config.json"):
        gemmaforge.load(tmp_path / "d")


def test_unknown_model_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GemmaforgeError) as e:
        gemmaforge.load(saved)
    assert "'llama'" in one_line(e)


def _edit_weights(saved, fn):
    path = saved / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_missing_tensor(saved):
    _edit_weights(saved, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(GemmaforgeError) as e:
        gemmaforge.load(saved)
    assert "layers.2.mlp.up_proj.weight" in one_line(e) and "missing" in one_line(e)


def test_unexpected_tensor(saved):
    _edit_weights(saved, lambda t: t.update({"model.layers.0.self_attn.rotary.weight": torch.zeros(2)}))
    with pytest.raises(GemmaforgeError) as e:
        gemmaforge.load(saved)
    assert "model.layers.0.self_attn.rotary.weight" in one_line(e)


def test_shape_mismatch(saved):
    _edit_weights(saved, lambda t: t.update({"model.norm.weight": torch.zeros(3)}))
    with pytest.raises(GemmaforgeError) as e:
        gemmaforge.load(saved)
    assert "final_norm.weight" in one_line(e) and "(3,)" in one_line(e)


def test_truncated_safetensors(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(GemmaforgeError) as e:
        gemmaforge.load(saved)
    assert "truncated or corrupt" in one_line(e)


def test_save_is_atomic(saved, monkeypatch):
    """A failure halfway through a save leaves the previous checkpoint intact and no temp files."""
    before = sorted(p.name for p in saved.iterdir())
    m = gemmaforge.load("tiny-gemma3")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError):
        gemmaforge.save_pretrained(m, saved)
    assert sorted(p.name for p in saved.iterdir()) == before
    assert json.loads((saved / "config.json").read_text())["model_type"] == "gemma2"
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saving_a_quantized_model_says_what_to_do(tmp_path, mode):
    """Its int8/int4 buffers have no HF name: one line naming the quantization and the remedy, no directory."""
    from gemmaforge.quant import quantize

    m = quantize(gemmaforge.load("tiny-gemma3"), mode, head=None)
    assert mode in m.quantization
    with pytest.raises(GemmaforgeError, match=f"quantized \\({re.escape(m.quantization)}\\)") as e:
        gemmaforge.save_pretrained(m, tmp_path / "q")
    assert "save the float model before quantizing, or load it again" in one_line(e)
    assert list(tmp_path.iterdir()) == []
