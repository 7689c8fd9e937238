"""The native decode step (decode_step.c, generation/native.py) against the eager torch step.

Oracle: ``fast.decode_step`` run eagerly on the same GGUF-native model and an identical cache, whose
own oracles (a full forward, transformers) are in tests/test_fast.py. Tiny Gemma 2 (soft-caps,
window 24) and Gemma 3 (QK-norm, window 8) files, decoded past the window so local layers wrap
their rings, batched rows of different lengths and an idle row included."""

from __future__ import annotations

import pytest
import torch

import gemmaforge
from gemmaforge import cpu_kernel
from gemmaforge import gguf_quant as gq
from gemmaforge.checkpoint import gguf as G
from gemmaforge.generation import Engine
from gemmaforge.generation.fast import FastForward, decode_step
from gemmaforge.generation.native import NativeStep, supported
from test_gguf import gguf_ready, random_tensors

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler for the native kernels")


def _tiny_gguf(tmp_path, name):
    c = gguf_ready(name)
    # twice test_gguf's scale: attention logits large enough that Gemma 2's soft-cap changes them
    tensors = {n: 2 * t for n, t in random_tensors(c, seed=3).items()}
    return gemmaforge.load(G.write_gguf(tmp_path / f"{name}.gguf", c, tensors, dtype="q8_0"))


def _unfuse(model):
    """The same weights as separate q/k/v and gate/up modules: what a file whose projections have
    different layouts (gguf_quant.concat refuses them) loads into."""
    c = model.config
    split = lambda f, sizes: [gq.BlockQuantLinear(f.codes[a:b].clone(), f.scale[a:b].clone(), None, f.group, f.qtype)
                              for a, b in zip([0, *sizes[:-1]], sizes)]
    for block in model.layers:
        nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        block.attn.q_proj, block.attn.k_proj, block.attn.v_proj = split(block.attn.fused_qkv, [nq, nq + nkv, nq + 2 * nkv])
        del block.attn.fused_qkv
        f = c.intermediate_size
        block.mlp.gate_proj, block.mlp.up_proj = split(block.mlp.fused_gate_up, [f, 2 * f])
        del block.mlp.fused_gate_up
    return model


def _decode_both(model, rows, steps, start, slack=0, length=64):
    """Decode ``steps`` tokens in ``rows`` pool rows with the native and the eager step, feeding both
    the eager step's greedy tokens; row r starts at position start[r] (None: idle). Returns the
    worst relative difference of the live rows' logits. With ``slack`` the rings hold more than a
    window, so the window is enforced by the mask, not by overwriting."""
    native, eager = FastForward(model, compile=False), FastForward(model, compile=False, native=False)
    assert native.native is not None and eager.native is None
    cn, ce = native.new_cache(rows, length, slack), eager.new_cache(rows, length, slack)
    tokens = torch.arange(1, rows + 1)[:, None]
    worst = 0.0
    with torch.inference_mode():
        for i in range(steps):
            pos = torch.tensor([[-1 if s is None else s + i] for s in start])
            a, b = native(tokens, pos, cn), eager(tokens, pos, ce)
            live = pos[:, 0] >= 0
            worst = max(worst, ((a[live] - b[live]).abs().max() / b[live].abs().max()).item())
            tokens = torch.where(live[:, None], b.argmax(-1, keepdim=True), 0)
        for i in range(model.config.num_layers):  # the cache holds the same keys and values
            torch.testing.assert_close(cn.k[i][live], ce.k[i][live], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cn.v[i][live], ce.v[i][live], rtol=1e-4, atol=1e-5)
    assert cn.lengths == ce.lengths
    return worst


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_native_step_equals_the_eager_step(tmp_path, name):
    model = _tiny_gguf(tmp_path, name)
    assert supported(model)
    # 40 steps: past both windows (24 and 8), so ring slots are overwritten and masked by position
    assert _decode_both(model, 1, 40, [0]) < 1e-5
    # rows of different lengths side by side, and an idle row (position -1) that must not disturb them
    assert _decode_both(model, 3, 30, [0, 7, None]) < 1e-5
    # idle rows below live ones (left out of the C call: each live row keeps its own cache row)
    assert _decode_both(model, 4, 20, [None, 0, None, 5]) < 1e-5
    assert _decode_both(model, 2, 40, [0, 5], slack=4) < 1e-5


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_native_attention_split_over_threads(tmp_path, name):
    """Past 128 cached slots each (row, KV head) is split into slot ranges, one per thread, merged by
    their softmax maxima and sums (decode_step.c's attend_part / merge_parts): 4 threads, 1-2 rows,
    contexts up to 200 tokens, the local layers' short rings (4 ranges of 2-6 slots) included."""
    model = _tiny_gguf(tmp_path, name)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert _decode_both(model, 1, 200, [0], length=256) < 1e-5
        assert _decode_both(model, 2, 140, [0, 60], length=256) < 1e-5
    finally:
        torch.set_num_threads(threads)


def test_native_step_with_separate_projections(tmp_path):
    model = _unfuse(_tiny_gguf(tmp_path, "tiny-gemma3"))
    assert not hasattr(model.layers[0].attn, "fused_qkv") and supported(model)
    assert _decode_both(model, 2, 20, [0, 3]) < 1e-5


def test_native_step_with_either_scale_type(tmp_path):
    """Q8_0's scales are float16 (gguf_quant.unpack) unless the AMX kernel is on: the step takes
    float32 ones as well, and both give the same logits up to summation order."""
    model = _tiny_gguf(tmp_path, "tiny-gemma3")
    linears = [m for m in model.modules() if isinstance(m, gq.BlockQuantLinear)]
    for want in (torch.float32, torch.float16):
        for m in linears:
            m.scale = m.scale.to(want)
        assert _decode_both(model, 2, 12, [0, 3]) < 1e-5


def test_native_step_is_the_default_only_where_it_applies(tmp_path):
    model = _tiny_gguf(tmp_path, "tiny-gemma3")
    fast = FastForward(model)
    assert fast.native is not None  # the default for a GGUF-native model
    # the compiled step would serve only pools of more than 16 rows: not set up before one comes,
    # and caches of up to 16 rows are sized as asked (not to the compiled step's window minimum)
    assert fast.compile and fast._step is decode_step
    assert not fast.compiled_for(16) and fast.compiled_for(17)
    assert fast.new_cache(2, 5).max_len == 5
    f32 = gemmaforge.load(tmp_path / "tiny-gemma3.gguf", quant="none")
    assert not supported(f32) and FastForward(f32).native is None
    with pytest.raises(ValueError, match="GGUF-native"):
        NativeStep(f32)
    with pytest.raises(ValueError, match="native=True"):
        FastForward(f32, native=True)


def test_engine_greedy_equals_the_eager_engine(tmp_path):
    """The whole Engine path (prefill by hidden_states, decode by the native step) gives the eager
    step's greedy tokens, alone and batched."""
    model = _tiny_gguf(tmp_path, "tiny-gemma2")
    prompts = [[2, 5, 9, 11], [2, 7]]
    outs = []
    for native in (True, False):
        engine = Engine(model, compile=False)
        engine.fast = FastForward(model, compile=False, native=native)
        outs.append(engine.generate(prompts, gemmaforge.SamplingParams(max_new_tokens=30)))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("n", [2048, 37])  # whole vectors, and a scalar tail
def test_gelu_mul_equals_torch(n):
    """decode_step.c's GELU (x / (1 + e^-2u), e^x from simd.h's vexp) against torch's
    gelu(approximate="tanh") * up, from where both saturate to where u is tiny: a few float32 ulps."""
    g = torch.Generator().manual_seed(0)
    gate = torch.cat([torch.linspace(-60, 60, n // 2), torch.randn(n - n // 2, generator=g) * 3])
    gate[:4] = torch.tensor([0.0, -0.0, 1e-30, -1e-6])
    up = torch.randn(n, generator=g)
    out = torch.empty(n)
    cpu_kernel.library().gf_gelu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), n)
    # float64 reference in the logistic form: 1 + tanh(u) cancels to 0 near x = -9, even in float64
    x = gate.double()
    u = 0.7978845608028654 * (x + 0.044715 * x**3)
    want = x * torch.sigmoid(2 * u) * up.double()
    assert torch.allclose(want, torch.nn.functional.gelu(x, approximate="tanh") * up.double(), atol=1e-12)
    # float32 rounding of u alone is ~1e-6 of the result in the tails; below 1e-20, anything that small
    torch.testing.assert_close(out.double(), want, rtol=3e-6, atol=1e-20)
    # and no further from the float64 values than torch's own float32 kernel
    torch32 = torch.nn.functional.gelu(gate, approximate="tanh") * up
    big = want.abs() > 1e-3
    rel = lambda v: ((v.double() - want).abs() / want.abs())[big].max()
    assert rel(out) <= rel(torch32)


def test_argmax_equals_torch():
    """gf_argmax (the greedy token, cpu_kernel.argmax) gives torch.argmax's indices: the first of
    tied maxima, the first NaN, 0 for a row of -inf, vector tails; torch's own for other inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1037, generator=g)  # 1037: not a whole number of vectors
    x[0, [5, 900]] = 9.0
    x[1, [7, 20]] = float("nan")
    x[2] = float("-inf")
    x[3, -1] = 50.0  # the maximum in the scalar tail
    x[4, [3, 4]] = torch.tensor([0.0, -0.0]) + 100
    for t in (x, torch.randn(4, 262144, generator=g), torch.randn(3, 5, generator=g), x[:, ::2]):
        assert torch.equal(cpu_kernel.argmax(t), t.argmax(-1))
    half = x.half()
    assert torch.equal(cpu_kernel.argmax(half), half.argmax(-1))
