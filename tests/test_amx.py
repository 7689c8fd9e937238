"""The AMX kernel (amx_gemm.c) against a float64 reference, and the model on it against the model off it.

The kernel splits x into three bf16 parts and multiplies them with bf16 codes; the claim is that this is
float32's product summed in another order. So its error against float64 must be of the size of a
float32 sgemm's on the dequantized weight (dropping the smallest part, or rounding x to bf16 once,
gives errors 30-3000x larger: the bound below catches both). Runs only on a CPU with AMX (Intel
Sapphire Rapids or later); elsewhere the kernel is not built and these tests skip."""

from __future__ import annotations

import pytest
import torch

import gemmaforge
from gemmaforge import cpu_kernel
from gemmaforge.checkpoint import gguf as G
from gemmaforge.generation import Engine, SamplingParams
from test_gguf import gguf_ready, random_tensors

pytestmark = pytest.mark.skipif(not (cpu_kernel.available() and cpu_kernel.amx_on()),
                                reason="no AMX on this CPU (or the kernel is turned off)")


@pytest.fixture
def amx_off():
    """Run a block with the AMX kernel off, then turn it back on."""
    def off():
        cpu_kernel.use_amx(False)
    yield off
    assert cpu_kernel.use_amx(True)


def _weight(n, k, gs, offset, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, k // gs, generator=g) * 0.02
    off = torch.randn(n, k // gs, generator=g) * 0.02 if offset else None
    w = codes.double().view(n, k // gs, gs) * scale.double()[..., None]
    if offset:
        w = w + off.double()[..., None]
    return codes, scale, off, w.view(n, k)


@pytest.mark.parametrize("m", [6, 7, 10, 11, 16, 37])  # stacked tiles (1 or 2), wide tiles (1-3, partial)
@pytest.mark.parametrize("gs,offset", [(32, True), (32, False), (16, False)])
def test_amx_product_is_float32_exact(m, gs, offset, amx_off):
    n, k = 48, 640  # 3 weight tiles of 16
    codes, scale, off, w = _weight(n, k, gs, offset, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[0] *= 1e-6   # a row far from the others' scale: per-element splitting, no shared exponent
    x[-1, ::3] *= 1e4
    x = x.float()
    ref = x.double() @ w.t()
    sgemm = x @ w.float().t()  # float32's own error on the same product
    y = cpu_kernel.run_block_gemv(x, codes, scale, off)
    amx_off()
    y_avx = cpu_kernel.run_block_gemv(x, codes, scale, off)
    # per output row (rows differ by 1e10 in size), relative to that row's largest |x| |w| sum
    size = x.double().abs() @ w.abs().t()
    for got in (y, y_avx):
        err = ((got.double() - ref).abs() / size).amax(dim=1)
        bound = ((sgemm.double() - ref).abs() / size).amax(dim=1)
        assert (err <= 4 * bound + 1e-8).all(), (err.max().item(), bound.max().item())
    # and one bf16 rounding of x would not pass: the test can tell
    rounded = x.bfloat16().float().double() @ w.t()
    assert (((rounded - ref).abs() / size).amax(dim=1) > 30 * bound + 1e-8).any()


def test_small_batches_keep_the_avx_kernel(amx_off):
    """Below 6 rows the AVX-512 kernel is faster (docs/quantization.md): same bits as with AMX off."""
    codes, scale, off, _ = _weight(32, 64, 32, True, seed=0)
    x = torch.randn(5, 64)
    y = cpu_kernel.run_block_gemv(x, codes, scale, off)
    amx_off()
    assert torch.equal(y, cpu_kernel.run_block_gemv(x, codes, scale, off))


def test_prefill_of_a_shape_amx_does_not_take_keeps_the_sgemm_path(monkeypatch):
    """24 output rows (not a multiple of the tile's 16): a 20-row product goes to dequantize + sgemm,
    not to the one-row-at-a-time GEMV, and is still the float32 product."""
    from gemmaforge.gguf_quant import BlockQuantLinear

    codes, scale, off, w = _weight(24, 64, 32, True, seed=2)
    lin, fits = BlockQuantLinear(codes, scale, off, 32), BlockQuantLinear(*_weight(32, 64, 32, True, seed=2)[:3], 32)
    assert not lin.amx_shape and fits.amx_shape
    calls = []
    monkeypatch.setattr(cpu_kernel, "run_block_gemv", lambda x, c, *a: calls.append(c) or x.new_zeros(x.shape[0], c.shape[0]))
    x = torch.randn(20, 64)
    with torch.inference_mode():
        y = lin(x)
    assert not calls
    assert ((y.double() - x.double() @ w.t()).abs().max() / (x.double().abs() @ w.abs().t()).max()).item() < 1e-6
    with torch.inference_mode():
        fits(x)
    assert len(calls) == 1  # the shape it takes does go to the kernel


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_model_with_amx_matches_model_without(tmp_path, name, amx_off):
    """Prefill logits of a 40-token prompt and 12 greedy tokens for 8 prompts at once (8 rows: the
    AMX kernel in every decode step), with the kernel on and off."""
    c = gguf_ready(name)
    model = gemmaforge.load(G.write_gguf(tmp_path / f"{name}.gguf", c, random_tensors(c, seed=5), dtype="q8_0"))
    from gemmaforge.gguf_quant import BlockQuantLinear

    linears = [m for m in model.modules() if isinstance(m, BlockQuantLinear)]
    assert linears and all(m.amx_shape for m in linears)  # else on and off would run the same kernel
    tokens = torch.randint(1, c.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    prompts = [list(range(3 + i, 12 + 2 * i)) for i in range(8)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)

    def run():
        with torch.inference_mode():
            logits = model(tokens, torch.arange(40)[None])
        return logits, Engine(model).generate(prompts, greedy)

    logits, texts = run()
    amx_off()
    ref_logits, ref_texts = run()
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() < 1e-5
    assert texts == ref_texts
