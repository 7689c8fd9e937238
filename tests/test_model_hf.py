"""The model against the oracle: transformers' Gemma2ForCausalLM / Gemma3ForCausalLM, fp32."""

import json

import pytest
import torch

import gemmaforge
from gemmaforge.checkpoint.hf import to_hf_name
from gemmaforge.config import from_hf_config, to_hf_config

transformers = pytest.importorskip("transformers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_model(model):
    hf = to_hf_config(model.config)
    cls = transformers.Gemma2Config if model.config.family == "gemma2" else transformers.Gemma3TextConfig
    cfg = cls(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    ref = (transformers.Gemma2ForCausalLM if model.config.family == "gemma2" else transformers.Gemma3ForCausalLM)(cfg)
    state = {to_hf_name(k): v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def test_config_round_trips_through_hf(config):
    assert from_hf_config(to_hf_config(config)) == config
    hf = hf_model(gemmaforge.Gemma(config)).config.to_dict()
    assert from_hf_config(hf) == config  # transformers' own spelling (rope_parameters) reads back too


def test_logits_match_transformers(model):
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    assert tokens.shape[1] > model.config.sliding_window
    with torch.no_grad():
        ours = model(tokens)
        ref = hf_model(model)(tokens).logits
    err = rel_err(ours, ref)
    print(f"{model.config.family} rel err {err:.2e}")
    assert err <= 1e-5


def test_save_pretrained_loads_in_transformers(model, tmp_path):
    gemmaforge.save_pretrained(model, tmp_path / "m")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32,
                                                            attn_implementation="eager")
    tokens = torch.arange(20)[None] % model.config.vocab_size
    with torch.no_grad():
        assert rel_err(model(tokens), ref(tokens).logits) <= 1e-5


def test_load_transformers_checkpoint(model, tmp_path):
    hf_model(model).save_pretrained(tmp_path / "hf")
    loaded = gemmaforge.load(tmp_path / "hf")
    assert loaded.config == model.config
    tokens = torch.arange(20)[None] % model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_sharded_save_and_load(model, tmp_path):
    gemmaforge.save_pretrained(model, tmp_path / "m", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = gemmaforge.load(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert len(ref.state_dict()) > 0


def test_bf16_embedding_normalizer_is_rounded():
    """sqrt(2304) = 48.0000 in bf16, 48.0 only after rounding (docs/reference.md §1)."""
    cfg = gemmaforge.preset("tiny-gemma2").replace(hidden_size=80)  # sqrt(80) = 8.944 -> bf16 8.9375
    m = gemmaforge.Gemma(cfg).init_weights().to(torch.bfloat16)
    with torch.no_grad():
        m.layers = torch.nn.ModuleList()
        m.final_norm.weight.zero_()
        h = m.hidden_states(torch.tensor([[5]]))
        e = m.embed.weight[5].float() * 8.9375
        expected = e * torch.rsqrt(e.pow(2).mean() + 1e-6)
    assert torch.allclose(h[0, 0].float(), expected, atol=1e-2)
    assert torch.tensor(80**0.5, dtype=torch.bfloat16).item() == 8.9375
