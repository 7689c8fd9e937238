"""GGUF: dequantization (bit-exact against the gguf package), reading, writing, errors, HF parity.

The oracles are independent implementations: ``gguf.quants.dequantize`` for every quant type,
``gguf.GGUFReader`` for the header parser, and transformers' GGUF loader for whole-model logits.
"""

from __future__ import annotations

import collections
import importlib.util
import re

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as Q

import gemmaforge
from gemmaforge.checkpoint import dequant
from gemmaforge.checkpoint import gguf as G
from gemmaforge.config import GLOBAL, preset
from gemmaforge.errors import GemmaforgeError

RNG = np.random.default_rng(0)
# Byte offsets of the float16 scale fields in each block of our own types (ggml-common.h layouts).
F16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
    Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}
QUANTIZED_OWN = list(F16_FIELDS)
FALLBACK = [q for q in gguf.quants._type_traits if q not in dequant.FORMATS]


def _gguf_can_quantize(qtype) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), np.float32), qtype)
        return True
    except NotImplementedError:  # the K-quants and IQ types: llama-quantize (C++) only
        return False


QUANTIZABLE = [q for q in [*dequant.FORMATS, *FALLBACK] if _gguf_can_quantize(q)]


def bits(x) -> np.ndarray:
    """float32 bit patterns, so that equality is exact (and NaN == NaN)."""
    x = x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return x.view(np.uint32)


# ---- dequantization ---------------------------------------------------------------------------------
def test_table_sizes_match_ggml():
    for qtype, fmt in dequant.FORMATS.items():
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype], qtype.name


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_dequantize_matches_gguf_on_quantized_data(qtype):
    """(a) real weights quantized by the gguf package itself, wherever it can quantize that type."""
    block = GGML_QUANT_SIZES[qtype][0]
    data = RNG.normal(0, 0.05, size=(6, 4 * max(block, 32))).astype(np.float32)
    raw = gguf.quants.quantize(data, qtype)
    ours = dequant.dequantize(raw, qtype, data.shape)
    ref = gguf.quants.dequantize(raw, qtype)
    assert ours.shape == data.shape
    if qtype in (Q.F32, Q.F16, Q.BF16):
        assert ours.dtype == {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
    else:
        assert ours.dtype == torch.float32
    assert np.array_equal(bits(ours), bits(ref))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the fallback types' random scales can be NaN
@pytest.mark.parametrize("qtype", QUANTIZED_OWN + FALLBACK, ids=lambda q: q.name)
def test_dequantize_matches_gguf_on_random_blocks(qtype):
    """(b) every bit pattern of the codes, with sane f16 scales (random bytes would be NaN/inf)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = 96
    raw = RNG.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for at in F16_FIELDS.get(qtype, []):
        raw[:, at : at + 2] = RNG.normal(0, 0.02, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    shape = (3, n_blocks // 3 * block)
    ours = dequant.dequantize(raw, qtype, shape)
    ref = gguf.quants.dequantize(raw.reshape(3, -1), qtype)
    assert np.array_equal(bits(ours), bits(ref))


def test_dequantize_shapes_and_errors():
    data = RNG.normal(size=(2, 3, 64)).astype(np.float32)
    raw = gguf.quants.quantize(data, Q.Q8_0)
    assert dequant.dequantize(raw, Q.Q8_0, (2, 3, 64)).shape == (2, 3, 64)
    assert dequant.dequantize(raw.reshape(-1), int(Q.Q8_0), [384]).shape == (384,)  # ints and lists work
    with pytest.raises(GemmaforgeError, match="needs 408 bytes"):
        dequant.dequantize(raw.reshape(-1)[:-34], Q.Q8_0, (384,))
    with pytest.raises(GemmaforgeError, match="multiple of 32"):
        dequant.dequantize(raw, Q.Q8_0, (12, 34))
    with pytest.raises(GemmaforgeError, match="Q8_K is not supported"):
        dequant.dequantize(np.zeros(292, np.uint8), Q.Q8_K, (256,))


def test_dequantize_does_not_alias_input():
    raw = np.arange(8, dtype=np.float32)
    out = dequant.dequantize(raw, Q.F32, (8,))
    raw[0] = 99
    assert out[0] == 0


# ---- names and config rules ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_name_map_is_a_bijection(name):
    internal = list(G.expected_shapes(preset(name)))
    gguf_names = [G.internal_to_gguf(n) for n in internal]
    assert None not in gguf_names and len(set(gguf_names)) == len(internal)
    assert [G.gguf_to_internal(n) for n in gguf_names] == internal
    assert G.gguf_to_internal("output.weight") is None and G.internal_to_gguf("lm_head.weight") is None


def _metadata(arch, layers, hidden, heads, head_dim, **extra):
    md = {"general.architecture": arch, f"{arch}.block_count": layers, f"{arch}.embedding_length": hidden,
          f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": heads // 2,
          f"{arch}.attention.key_length": head_dim, f"{arch}.feed_forward_length": 4 * hidden,
          f"{arch}.context_length": 8192, f"{arch}.attention.sliding_window": 4096,
          "tokenizer.ggml.tokens": ["a"] * 10}
    return md | {f"{arch}.{k}": v for k, v in extra.items()}


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def test_query_scale_follows_llama_cpp_size_rule():
    # 27B models (by block count, as llama.cpp decides) scale by hidden/heads, others by head_dim.
    assert G.config_from_metadata(_metadata("gemma2", 46, 4608, 32, 128)).query_pre_attn_scalar == 144
    assert G.config_from_metadata(_metadata("gemma2", 42, 3584, 16, 256)).query_pre_attn_scalar == 256
    assert G.config_from_metadata(_metadata("gemma3", 62, 5376, 32, 128)).query_pre_attn_scalar == 168
    assert G.config_from_metadata(_metadata("gemma3", 26, 1152, 4, 256)).query_pre_attn_scalar == 256


def test_config_rules_from_metadata():
    c = G.config_from_metadata(_metadata("gemma2", 4, 64, 4, 16, attn_logit_softcapping=40.0))
    assert (c.attn_logit_softcap, c.final_logit_softcap) == (40.0, 30.0)  # 30: llama.cpp's default
    assert (c.rope_theta, c.rope_local_theta) == (1e4, 1e4)
    assert c.layer_types[:2] == ("sliding_attention", "full_attention") and c.vocab_size == 10
    c = G.config_from_metadata(
        _metadata("gemma3", 12, 64, 4, 16, **{"rope.freq_base": 1e6, "rope.scaling.type": "linear",
                                              "rope.scaling.factor": 8.0})
    )
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling_factor, c.qk_norm) == (1e6, 1e4, 8.0, True)
    assert [i for i, t in enumerate(c.layer_types) if t == GLOBAL] == [5, 11]
    assert c.attn_logit_softcap is None and c.final_logit_softcap is None
    c = G.config_from_metadata(_metadata("gemma3", 3, 64, 4, 16, **{"attention.sliding_window": 0}))
    assert c.layer_types == (GLOBAL,) * 3  # no window stored: every layer global
    with pytest.raises(GemmaforgeError, match="'llama'"):
        G.config_from_metadata({"general.architecture": "llama"})
    with pytest.raises(GemmaforgeError, match="gemma2.block_count"):
        G.config_from_metadata(without(_metadata("gemma2", 4, 64, 4, 16), "gemma2.block_count"))


# ---- tiny models: write, read back, compare with transformers ------------------------------------
def gguf_ready(name):
    """A tiny preset adjusted to what GGUF can store (llama.cpp derives the query scale and fixes
    the gemma3 local rope theta); the presets deliberately use other values to catch bugs elsewhere."""
    c = preset(name)
    c = c.replace(query_pre_attn_scalar=c.head_dim)
    return c.replace(rope_local_theta=10000.0) if c.family == "gemma3" else c


def random_tensors(config, seed=0):
    """Random weights in internal names, norms included (zero norms would hide a missing +1/-1)."""
    g = torch.Generator().manual_seed(seed)
    return {n: 0.1 * torch.randn(s, generator=g) for n, s in G.expected_shapes(config).items()}


SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3, as in Gemma (docs/reference.md §3)


def fake_tokenizer(vocab):
    """Tokenizer fields as llama.cpp writes them; transformers takes the vocabulary size from them."""
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [*SPECIAL, *(f"t{i}" for i in range(4, vocab))],
            "tokenizer.ggml.scores": [-1000.0] * 4 + [-float(i) for i in range(4, vocab)],
            "tokenizer.ggml.token_type": [3, 3, 3, 2] + [1] * (vocab - 4),
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
            "tokenizer.ggml.add_space_prefix": False}


def forward(config, tensors):
    from gemmaforge.checkpoint import materialize

    model = materialize(config, ((k, v, "test") for k, v in tensors.items()), dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids), ids


needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers' GGUF loader needs transformers and accelerate",
)

# Max logit error of a written-and-read-back model against the float32 original, relative to the
# largest logit: 16x the format's relative rounding error (f16 2^-11, bf16 2^-9, q8_0 half a step of
# 1/127 of the block maximum); the random tiny models amplify weight error by 4-7x (measured).
ROUND_TRIP_TOL = {"f32": 1e-6, "f16": 16 * 2**-11, "bf16": 16 * 2**-9, "q8_0": 16 / 254}


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_write_read_round_trip(tmp_path, name, dtype):
    config = gguf_ready(name)
    tensors = random_tensors(config)
    path = G.write_gguf(tmp_path / "m.gguf", config, tensors, fake_tokenizer(config.vocab_size), dtype=dtype)
    ck = G.read_gguf(path)
    assert ck.config == config
    assert set(ck.tensors) == set(tensors)
    for n, t in tensors.items():
        back = ck.tensors[n]
        if G.is_norm(n):  # always F32; (w + 1) - 1 is within an ulp of 1
            assert ck.tensor_types[n] == "F32" and torch.allclose(back, t, rtol=0, atol=2.5e-7)
        elif dtype == "q8_0":  # one f16 scale per 32 weights: error <= scale / 2
            assert ck.tensor_types[n] == "Q8_0"
            assert (back - t).abs().max() <= t.abs().max() / 127 * 0.6
        else:
            assert ck.tensor_types[n] == dtype.upper()
            assert torch.equal(back.float(), t.to({"f32": torch.float32, "f16": torch.float16,
                                                   "bf16": torch.bfloat16}[dtype]).float())
    assert ck.metadata["tokenizer.ggml.tokens"][:3] == ["<pad>", "<eos>", "<bos>"]

    ref, ids = forward(config, tensors)
    got, _ = forward(ck.config, ck.tensors)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= ROUND_TRIP_TOL[dtype], rel


@needs_hf
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_written_file_loads_in_transformers(tmp_path, name, dtype):
    from transformers import AutoModelForCausalLM

    config = gguf_ready(name)
    tokenizer = fake_tokenizer(config.vocab_size)
    G.write_gguf(tmp_path / "m.gguf", config, random_tensors(config), tokenizer, dtype=dtype)
    ck = G.read_gguf(tmp_path / "m.gguf")
    ours, ids = forward(ck.config, ck.tensors)
    # transformers does not derive the query scale from GGUF; it defaults to 256, true for every
    # released non-27B Gemma (head_dim 256), not for the tiny test models: pass it in.
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32,
        query_pre_attn_scalar=config.query_pre_attn_scalar,
    ).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5


def test_header_parser_agrees_with_gguf_reader(tmp_path):
    config = gguf_ready("tiny-gemma3").replace(rope_scaling_factor=8.0)
    extra = fake_tokenizer(config.vocab_size) | {"general.name": "tiny", "test.flags": [True, False],
                                                 "test.big": -(2**40), "test.pi": 3.14159}
    path = G.write_gguf(tmp_path / "m.gguf", config, random_tensors(config), extra, dtype="q8_0")
    reader = GGUFReader(path)
    md = G.read_gguf_metadata(path)
    assert list(md) == [k for k in reader.fields if not k.startswith("GGUF.")]
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        if isinstance(want, float):  # we return the shortest decimal of the same float32
            assert np.float32(md[key]) == np.float32(want), key
        elif isinstance(want, list) and want and isinstance(want[0], float):
            assert np.array_equal(np.float32(md[key]), np.float32(want)), key
        else:
            assert md[key] == want, key
    _, buf = G._open(path)
    _, infos = G._parse(buf, with_tensors=True)
    assert [(i.name, i.qtype, i.shape) for i in infos] == [
        (t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors
    ]
    assert [i.offset for i in infos] == [int(t.data_offset) for t in reader.tensors]
    assert G.read_gguf(path).config == config


def test_writer_uses_llama_cpp_keys(tmp_path):
    expected = {
        "gemma2": ["context_length", "embedding_length", "block_count", "feed_forward_length",
                   "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
                   "attention.key_length", "attention.value_length", "attn_logit_softcapping",
                   "final_logit_softcapping", "attention.sliding_window", "rope.freq_base"],
        "gemma3": ["context_length", "embedding_length", "block_count", "feed_forward_length",
                   "attention.head_count", "attention.layer_norm_rms_epsilon", "attention.key_length",
                   "attention.value_length", "rope.freq_base", "attention.sliding_window",
                   "attention.head_count_kv"],
    }
    for arch, keys in expected.items():
        config = gguf_ready(f"tiny-{arch}")  # tiny-gemma2 has rope theta 5000, so freq_base is written
        md = G.read_gguf_metadata(G.write_gguf(tmp_path / f"{arch}.gguf", config, random_tensors(config),
                                               fake_tokenizer(config.vocab_size)))
        assert [k[len(arch) + 1 :] for k in md if k.startswith(arch + ".")] == keys
        assert md["general.architecture"] == arch and md["general.file_type"] == 0


# ---- the embedded Gemma 3 270M Q4_K_M file -------------------------------------------------------------
@pytest.fixture(scope="module")
def real_path(embedded_gguf):
    return embedded_gguf


@pytest.fixture(scope="module")
def real_ckpt(real_path):
    return G.read_gguf(real_path)


def test_real_file_config_and_types(real_ckpt):
    assert real_ckpt.config == preset("gemma3-270m")
    assert collections.Counter(real_ckpt.tensor_types.values()) == {
        "F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    assert real_ckpt.tensors["embed.weight"].shape == (262144, 640)
    assert real_ckpt.tensors["layers.0.attn.o_proj.weight"].shape == (640, 1024)
    assert real_ckpt.metadata["tokenizer.ggml.bos_token_id"] == 2
    assert len(real_ckpt.metadata["tokenizer.ggml.tokens"]) == 262144


def test_real_file_every_tensor_bit_exact(real_path, real_ckpt):
    """(c) every tensor of the real file against gguf.quants.dequantize on the same bytes."""
    _, buf = G._open(real_path)
    _, infos = G._parse(buf, with_tensors=True)
    for info in infos:
        raw = np.frombuffer(buf, np.uint8, count=dequant.nbytes(info.qtype, info.shape), offset=info.offset)
        ref = gguf.quants.dequantize(raw.reshape(info.shape[0] if len(info.shape) > 1 else 1, -1), info.qtype)
        ref = ref.reshape(info.shape)
        name = G.gguf_to_internal(info.name)
        ours = real_ckpt.tensors[name]
        if G.is_norm(name):  # read_gguf hands out w, the file stores 1 + w
            assert np.array_equal(bits(ours), bits(ref - np.float32(1))), info.name
        else:
            assert np.array_equal(bits(ours), bits(ref)), info.name


@pytest.mark.slow  # ~20 s of CPU, nearly all in transformers' loader
@needs_hf
def test_real_file_logits_match_transformers(real_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    # transformers parses the file twice (config, then weights), and GGUFReader spends ~11 s on the
    # 262,144-token vocabulary each time: let the second parse reuse the first. The oracle is unchanged.
    readers: dict[str, GGUFReader] = {}

    def reader_once(path, *args, **kwargs):
        if str(path) not in readers:
            readers[str(path)] = GGUFReader(path, *args, **kwargs)
        return readers[str(path)]

    monkeypatch.setattr(gguf, "GGUFReader", reader_once)

    ours = gemmaforge.load(real_path)
    hf = AutoModelForCausalLM.from_pretrained(str(real_path.parent), gguf_file=real_path.name,
                                              dtype=torch.float32).eval()
    assert len(readers) == 1
    ids = torch.tensor([[2, 651, 6037, 576, 6081, 603, 9047, 235265, 1417, 603, 476, 2121]])
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


# ---- errors: one line, naming the file/tensor/key ---------------------------------------------------------
def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def write_raw(path, arch, config, tensors: dict[str, np.ndarray], tokens=True):
    """A GGUF written straight through GGUFWriter, for files write_gguf would refuse to make."""
    w = GGUFWriter(path, arch)
    G._arch_metadata(w, config)
    if tokens:
        w.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_file(tmp_path):
    config = gguf_ready("tiny-gemma2")
    tokenizer = fake_tokenizer(config.vocab_size)
    return G.write_gguf(tmp_path / "tiny.gguf", config, random_tensors(config), tokenizer)


def gguf_arrays(config):
    """GGUF-named float32 arrays of a random model, norms stored as 1 + w like the converter does."""
    tensors = random_tensors(config)
    return {G.internal_to_gguf(n): t.numpy() + (1 if G.is_norm(n) else 0) for n, t in tensors.items()}


def test_error_missing_and_empty_file(tmp_path):
    with pytest.raises(GemmaforgeError, match="not found") as e:
        G.read_gguf(tmp_path / "nope.gguf")
    assert "nope.gguf" in one_line(e)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GemmaforgeError, match="empty"):
        G.read_gguf_metadata(tmp_path / "empty.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GemmaforgeError, match="bad magic") as e:
        G.read_gguf(tmp_path / "junk.gguf")
    assert "junk.gguf" in one_line(e)


@pytest.mark.parametrize("keep", [10, 200, 0.5, 0.99])
def test_error_truncated_file(tiny_file, keep):
    data = tiny_file.read_bytes()
    cut = keep if isinstance(keep, int) else int(len(data) * keep)
    tiny_file.write_bytes(data[:cut])
    with pytest.raises(GemmaforgeError, match="truncated") as e:
        G.read_gguf(tiny_file)
    assert str(tiny_file) in one_line(e)


def test_error_corrupt_header(tiny_file):
    data = bytearray(tiny_file.read_bytes())
    data[4:8] = (7).to_bytes(4, "little")  # version
    tiny_file.write_bytes(bytes(data))
    with pytest.raises(GemmaforgeError, match="version 7"):
        G.read_gguf(tiny_file)
    data[4:8] = (3).to_bytes(4, "little")
    data[24 + 8 + len("general.architecture") : 28 + 8 + len("general.architecture")] = b"\xff\x00\x00\x00"
    tiny_file.write_bytes(bytes(data))
    with pytest.raises(GemmaforgeError, match="unknown metadata value type 255") as e:
        G.read_gguf(tiny_file)
    one_line(e)


def test_error_unsupported_architecture(tmp_path):
    config = gguf_ready("tiny-gemma2")
    path = write_raw(tmp_path / "llama.gguf", "llama", config, {"token_embd.weight": np.zeros((8, 64), "f4")})
    with pytest.raises(GemmaforgeError, match="general.architecture='llama'") as e:
        G.read_gguf(path)
    assert "llama.gguf" in one_line(e)


def test_error_tensor_set(tmp_path):
    config = gguf_ready("tiny-gemma2")
    arrays = gguf_arrays(config)
    missing = {k: v for k, v in arrays.items() if k != "blk.2.ffn_up.weight"}
    with pytest.raises(GemmaforgeError, match="missing tensor 'blk.2.ffn_up.weight'") as e:
        G.read_gguf(write_raw(tmp_path / "a.gguf", "gemma2", config, missing))
    one_line(e)
    with pytest.raises(GemmaforgeError, match="unexpected tensor 'output.weight'"):
        extra = arrays | {"output.weight": arrays["token_embd.weight"]}
        G.read_gguf(write_raw(tmp_path / "b.gguf", "gemma2", config, extra))
    bad_shape = arrays | {"blk.0.attn_q.weight": np.zeros((32, 64), np.float32)}
    with pytest.raises(GemmaforgeError, match="'blk.0.attn_q.weight' has shape \\[32, 64\\]"):
        G.read_gguf(write_raw(tmp_path / "c.gguf", "gemma2", config, bad_shape))
    int_type = arrays | {"blk.1.ffn_down.weight": np.zeros((64, 128), np.int32)}
    with pytest.raises(GemmaforgeError, match="'blk.1.ffn_down.weight' uses ggml type I32") as e:
        G.read_gguf(write_raw(tmp_path / "d.gguf", "gemma2", config, int_type))
    assert "requantize" in one_line(e)
    # No tokenizer at all: the vocabulary comes from the embedding, and the file still loads.
    no_tokenizer = write_raw(tmp_path / "e.gguf", "gemma2", config, arrays, tokens=False)
    assert G.read_gguf(no_tokenizer).config == config


def test_write_errors_and_atomicity(tmp_path, monkeypatch):
    config = gguf_ready("tiny-gemma3")
    tensors = random_tensors(config)
    with pytest.raises(GemmaforgeError, match="rope_local_theta=3000") as e:
        G.write_gguf(tmp_path / "x.gguf", preset("tiny-gemma3"), random_tensors(preset("tiny-gemma3")))
    assert "query_pre_attn_scalar=20" in one_line(e)
    with pytest.raises(GemmaforgeError, match="directory .*nodir does not exist"):
        G.write_gguf(tmp_path / "nodir" / "x.gguf", config, tensors)
    with pytest.raises(GemmaforgeError, match="unknown GGUF dtype 'q4'"):
        G.write_gguf(tmp_path / "x.gguf", config, tensors, dtype="q4")
    with pytest.raises(GemmaforgeError, match="'layers.6.mlp.up_proj.weight' is missing"):
        G.write_gguf(tmp_path / "x.gguf", config, {k: v for k, v in tensors.items() if "6.mlp.up" not in k})
    with pytest.raises(GemmaforgeError, match="unexpected tensor 'lm_head.weight'"):
        G.write_gguf(tmp_path / "x.gguf", config, tensors | {"lm_head.weight": tensors["embed.weight"]})
    with pytest.raises(GemmaforgeError, match="has 10 tokens but vocab_size is 512"):
        G.write_gguf(tmp_path / "x.gguf", config, tensors, {"tokenizer.ggml.tokens": ["a"] * 10})

    target = G.write_gguf(tmp_path / "x.gguf", config, tensors)
    before = target.read_bytes()

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        G.write_gguf(target, config, random_tensors(config, seed=1))
    assert target.read_bytes() == before  # the old file is untouched ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]  # ... and no temp file is left


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_is_refused_with_one_line(tmp_path, mode):
    """quant.quantize replaces the float weights with int8/int4 buffers that GGUF has no name for:
    saving says so (and what to do) instead of failing on a tensor name, and writes nothing."""
    from gemmaforge.checkpoint import materialize
    from gemmaforge.quant import quantize

    config = gguf_ready("tiny-gemma2")
    model = materialize(config, ((k, v, "test") for k, v in random_tensors(config).items()), dtype=torch.float32)
    assert G.read_gguf(G.save_gguf(model, tmp_path / "float.gguf")).config == config  # the float model saves
    quantize(model, mode)
    assert mode in model.quantization
    with pytest.raises(GemmaforgeError, match=f"quantized \\({re.escape(model.quantization)}\\)") as e:
        G.save_gguf(model, tmp_path / "q.gguf")
    assert "save the float model before quantizing, or load it again" in one_line(e)
    # The bare writer gets only a state dict, and recognises the quantized buffers in it.
    with pytest.raises(GemmaforgeError, match="quantized model") as e:
        G.write_gguf(tmp_path / "q.gguf", config, dict(model.state_dict()))
    assert "save the float model before quantizing" in one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.gguf"]
