import pytest
import torch

from gemmaforge import Gemma, preset

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# Dynamo counts compilations per code object: a real process compiles the decode step for one or two
# models, but this test session builds a dozen quantized models and compiles it for each.
torch._dynamo.config.recompile_limit = 64


def randomize(model: Gemma, seed: int = 0) -> Gemma:
    """Random weights everywhere, norms included (zero norms would hide a (1 + w) mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if name.endswith("norm.weight") else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


# Tiny configs that exercise every quirk: >= 3 layers, GQA ratio > 1, window shorter than the test
# sequences, query_pre_attn_scalar != head_dim, non-default rope thetas (docs/reference.md §1-2).
CONFIGS = {
    "gemma2": preset("tiny-gemma2"),
    "gemma2-27b-like": preset("tiny-gemma2").replace(
        num_heads=8, num_kv_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=5
    ),
    "gemma3": preset("tiny-gemma3"),
    "gemma3-rope-scaled": preset("tiny-gemma3").replace(
        rope_scaling_factor=8.0, layer_types=("sliding_attention", "full_attention", "sliding_attention")
    ),
}


@pytest.fixture(scope="session")
def embedded_gguf():
    """Path of the embedded Gemma 3 270M GGUF (PyPI package); tests that need it skip without it."""
    from gemmaforge.default_model import default_model_path
    from gemmaforge.errors import GemmaforgeError

    try:
        return default_model_path()
    except GemmaforgeError as e:
        pytest.skip(str(e))


@pytest.fixture(params=list(CONFIGS))
def config(request):
    return CONFIGS[request.param]


@pytest.fixture
def model(config):
    return randomize(Gemma(config))
