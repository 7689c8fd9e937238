"""Issue 14: GGUF block-quantized weights kept as stored (gguf_quant.py, docs/quantization.md).

Oracles: ``gguf.quants.dequantize`` for the packed values (bit-exact), x @ dequantized.T for the
chunked matmul, and the float32 load of the same file for whole-model logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

import gemmaforge
from gemmaforge.generation import Engine
from gemmaforge import cpu_kernel
from gemmaforge import gguf_quant as gq
from gemmaforge.checkpoint import gguf as G
from gemmaforge.config import preset
from gemmaforge.errors import GemmaforgeError

RNG = np.random.default_rng(0)
F16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
              Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def _random_blocks(qtype, rows=3, blocks_per_row=4):
    block, size = GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, size=(rows * blocks_per_row, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:  # sane f16 scales: random bytes would be NaN/inf
        raw[:, at : at + 2] = RNG.normal(0, 0.02, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw, (rows, blocks_per_row * block)


def test_every_packed_type_is_covered():
    assert set(gq.FORMATS) == set(F16_FIELDS)
    for qtype, (block, size, _, _) in gq.FORMATS.items():
        assert (block, size) == GGML_QUANT_SIZES[qtype]


HALF = pytest.mark.parametrize("half", [True, False], ids=["f16-scales", "f32-scales"])


@HALF
@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_unpacked_codes_dequantize_to_the_gguf_values(qtype, half):
    raw, shape = _random_blocks(qtype)
    codes, scale, offset, group = gq.unpack(torch.from_numpy(raw.copy()), qtype, shape, half=half)
    assert codes.dtype == torch.int8 and scale.shape == (shape[0], shape[1] // group)
    # float16 only where the file's scales are float16: the K-quants' products need float32
    assert scale.dtype == (torch.float16 if half and qtype in gq.HALF_SCALES else torch.float32)
    assert offset is None or offset.dtype == scale.dtype
    assert (offset is not None) == (qtype in gq.HAS_OFFSET)
    ours = gq.dequantize_codes(codes, scale, offset).numpy()
    ref = gguf_quants.dequantize(raw.reshape(shape[0], -1), qtype).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_unpack_does_not_alias_its_input():
    raw, shape = _random_blocks(Q.Q8_0, rows=1, blocks_per_row=1)
    t = torch.from_numpy(raw.copy())
    codes, *_ = gq.unpack(t, Q.Q8_0, shape)
    before = codes.clone()
    t.zero_()
    assert torch.equal(codes, before)


def test_unpack_rejects_wrong_sizes():
    raw, shape = _random_blocks(Q.Q4_K)
    with pytest.raises(GemmaforgeError):
        gq.unpack(torch.from_numpy(raw.copy()), Q.Q4_K, (shape[0], shape[1] + 256))


@HALF
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_chunked_matmul_equals_x_times_dequantized(qtype, rows, half, monkeypatch):
    raw, shape = _random_blocks(qtype, rows=37, blocks_per_row=2)
    lin = gq.BlockQuantLinear(*gq.unpack(torch.from_numpy(raw.copy()), qtype, shape, half=half), qtype.name)
    monkeypatch.setattr(gq, "_CHUNK_WEIGHTS", 3 * shape[1])  # several chunks and a ragged last one
    gq._local.buf = None
    x = torch.randn(rows, shape[1])
    w = lin.dequantize()
    ref = x @ w.T
    bound = _bound(x, w)
    with torch.no_grad():
        assert ((lin._chunked(x) - ref).abs() <= bound).all()  # the prefill path, at any row count
        assert ((lin(x) - ref).abs() <= bound).all()  # whichever path the row count picks
    x.requires_grad_(True)  # autograd takes the reference path (no out= matmuls)
    assert ((lin(x) - ref).abs() <= bound).all()


def _linear(qtype, rows=37, blocks_per_row=2, half=None):
    raw, shape = _random_blocks(qtype, rows=rows, blocks_per_row=blocks_per_row)
    return gq.BlockQuantLinear(*gq.unpack(torch.from_numpy(raw.copy()), qtype, shape, half=half), qtype.name)


def _bound(x, w):
    return 1e-5 * (x.abs() @ w.abs().T) + 1e-7  # float32 accumulation order, relative to the terms


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the kernel is not built")
@HALF
@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_native_gemv_kernel_equals_x_times_dequantized(qtype, half):
    """block_gemv.c for every layout (groups of 16 and 32, with and without offsets, float16 and
    float32 scales) and every row count below the sgemm threshold (its tiles of 4, 3, 2 and 1 rows)."""
    lin = _linear(qtype, half=half)
    w = lin.dequantize()
    for rows in range(1, gq._GEMV_ROWS):
        x = torch.randn(rows, lin.in_features)
        y = cpu_kernel.run_block_gemv(x, lin.codes, lin.scale, lin.offset)
        assert y.shape == (rows, lin.out_features)
        assert ((y - x @ w.T).abs() <= _bound(x, w)).all(), rows


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the kernel is not built")
@HALF
@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_native_dequantization_is_bit_exact(qtype, half):
    """block_gemv.c's dequantization (the prefill path's buffer) gives the gguf package's values,
    bit for bit, signed zeros included: no fused multiply-add, no lost -0.0."""
    raw, shape = _random_blocks(qtype, rows=7, blocks_per_row=2)
    codes, scale, offset, _ = gq.unpack(torch.from_numpy(raw.copy()), qtype, shape, half=half)
    scale[0, 0], codes[0, : gq.FORMATS[qtype][2]] = -0.0, 0  # a group of -0.0 weights
    ours = cpu_kernel.dequantize_into(torch.empty(shape), codes, scale, offset)
    ref = gq.dequantize_codes(codes, scale, offset)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the kernel is not built")
def test_native_gemv_is_one_node_of_a_compiled_graph():
    """fullgraph=True: the custom op keeps the kernel inside a compiled decode step, no graph break."""
    lin = _linear(Q.Q4_K, rows=19, blocks_per_row=1)
    x = torch.randn(3, lin.in_features)
    step = torch.compile(lambda t: lin(t * 2.0) + 1.0, fullgraph=True)  # exact ops around it: same bits
    with torch.inference_mode():
        torch.testing.assert_close(step(x), lin(x * 2.0) + 1.0, rtol=0, atol=0)


def test_concat_is_exact_and_refuses_mixed_layouts():
    a = gq.BlockQuantLinear(*gq.unpack(torch.from_numpy(_random_blocks(Q.Q8_0)[0]), Q.Q8_0, (3, 128)), "Q8_0")
    b = gq.BlockQuantLinear(*gq.unpack(torch.from_numpy(_random_blocks(Q.Q5_0)[0]), Q.Q5_0, (3, 128)), "Q5_0")
    k = gq.BlockQuantLinear(*gq.unpack(torch.from_numpy(_random_blocks(Q.Q4_K, 3, 1)[0]), Q.Q4_K, (3, 256)), "Q4_K")
    fused = gq.concat([a, b])
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    assert gq.concat([a, k]) is None
    # float16 and float32 scales together: widened, still exact
    wide = gq.BlockQuantLinear(*gq.unpack(torch.from_numpy(_random_blocks(Q.Q5_0)[0]), Q.Q5_0, (3, 128), half=False), "Q5_0")
    narrow = gq.BlockQuantLinear(*gq.unpack(torch.from_numpy(_random_blocks(Q.Q8_0)[0]), Q.Q8_0, (3, 128), half=True), "Q8_0")
    mixed = gq.concat([narrow, wide, narrow])
    assert narrow.scale.dtype == torch.float16 and mixed.scale.dtype == torch.float32
    assert torch.equal(mixed.dequantize(), torch.cat([narrow.dequantize(), wide.dequantize(), narrow.dequantize()]))


def _tiny_q8_file(tmp_path):
    c = preset("tiny-gemma3")  # adjusted to what GGUF stores, as tests/test_gguf.py's gguf_ready
    c = c.replace(query_pre_attn_scalar=c.head_dim, rope_local_theta=10000.0)
    g = torch.Generator().manual_seed(1)
    tensors = {n: 0.1 * torch.randn(s, generator=g) for n, s in G.expected_shapes(c).items()}
    return G.write_gguf(tmp_path / "tiny.gguf", c, tensors, dtype="q8_0")


def test_load_gguf_quant_matches_the_float32_load(tmp_path):
    path = _tiny_q8_file(tmp_path)
    assert G.is_quantized_file(path)
    ref = gemmaforge.load(path, quant="none")
    native = gemmaforge.load(path, quant="gguf")
    assert native.quantization.startswith("gguf Q8_0")
    assert isinstance(native.embed, gq.BlockQuantEmbedding)
    assert hasattr(native.layers[0].attn, "fused_qkv") and hasattr(native.layers[0].mlp, "fused_gate_up")
    tokens = torch.randint(0, ref.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(native.embed(tokens), ref.embed(tokens), rtol=0, atol=0)
        torch.testing.assert_close(native(tokens), ref(tokens), rtol=1e-4, atol=1e-4)
    # the default keeps the file's quantization; a float32 request or quant="none" dequantizes it
    assert gemmaforge.load(path).quantization == native.quantization
    assert not getattr(gemmaforge.load(path, dtype="float32"), "quantization", None)
    assert not getattr(gemmaforge.load(path, quant="none"), "quantization", None)
    # a quantized model refuses to be saved
    with pytest.raises(GemmaforgeError, match="quantized"):
        G.save_gguf(native, tmp_path / "again.gguf")


def test_benchmark_measures_the_file_as_stored_and_end_to_end(tmp_path):
    from gemmaforge.benchmark import BenchSettings, run_benchmark
    from gemmaforge.benchmark_report import format_table

    path = _tiny_q8_file(tmp_path)
    s = BenchSettings(prompt_len=12, new_tokens=3, batch=2, repeats=1, ppl_chars=0, isolate=False,
                      variants=("gemmaforge:gguf",), e2e_tokens=4)
    report = run_benchmark(path, s, tmp_path / "work", progress=False)
    (r,) = report["results"]
    assert r["weights"] == "Q8_0 as stored" and r["load_s"] > 0 and r["decode_tok_s_b1"] > 0
    # the tiny file has no tokenizer, so `gemmaforge generate` exits 2: reported, not raised
    assert report["end_to_end"]["gemmaforge generate"]["failed"].startswith("exit 2")
    assert "gemmaforge generate: exit 2" in format_table(report)


def test_load_gguf_quant_errors(tmp_path):
    path = _tiny_q8_file(tmp_path)
    with pytest.raises(GemmaforgeError, match="unknown quant"):
        gemmaforge.load(path, quant="int3")
    with pytest.raises(GemmaforgeError, match="float32 activations"):
        gemmaforge.load(path, dtype="bfloat16", quant="gguf")
    with pytest.raises(GemmaforgeError, match="not a GGUF"):
        gemmaforge.load("tiny-gemma3", quant="gguf")


# ---- the embedded 270M model (Q8_0 head, Q5_0/Q8_0/Q4_K/Q6_K layers) ------------------------------
TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning the universe was created. This has"
        " made a lot of people very angry and been widely regarded as a bad move. It was a bright cold")


def test_embedded_model_native_matches_float32():
    """Teacher-forced log-probs within 1e-3 of the float32 load, and the same greedy continuation."""
    tok = gemmaforge.load_tokenizer(None)
    ids = torch.tensor([tok.encode(TEXT)[:64]])  # <bos> included
    ref = gemmaforge.load(None, dtype=torch.float32)
    native = gemmaforge.load(None, quant="gguf")
    with torch.inference_mode():
        lp_ref, lp_nat = ref(ids).log_softmax(-1), native(ids).log_softmax(-1)
        assert (lp_nat - lp_ref).abs().max().item() <= 1e-3
        params = gemmaforge.SamplingParams(max_new_tokens=8)
        outs = [gemmaforge.generate(Engine(m, compile=False), tok, ["The capital of France is"],
                                    params=params)[0] for m in (ref, native)]
    assert outs[0] == outs[1]


def test_empty_on_huge_pages():
    """A plain tensor of the asked shape and dtype; where Linux has transparent huge pages on
    ("madvise" or "always"), the mapping holding a large one is eligible for them (smaps)."""
    for shape, dtype in (((3, 5), torch.float16), ((0,), torch.int8), ((5 << 20,), torch.int8)):
        t = cpu_kernel.empty_on_huge_pages(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        t.fill_(1)
        assert t.numel() == 0 or t.float().sum().item() == t.numel()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this machine")
    big = cpu_kernel.empty_on_huge_pages((8 << 20,), torch.int8)
    at = big.data_ptr() + (4 << 20)
    vma = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            vma = lo <= at < hi
        elif vma and line.startswith("THPeligible:"):
            assert line.split()[1] == "1"
            return
    if "THPeligible:" not in Path("/proc/self/smaps").read_text():
        pytest.skip("this kernel's smaps has no THPeligible field")
    pytest.fail("the tensor's mapping is not in /proc/self/smaps")
