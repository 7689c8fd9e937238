"""Tokenizer: ids equal transformers' on the embedded Gemma 3 GGUF, decoding round-trips, streaming
decoding never splits a character, and every source format loads (or fails with one clear line)."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from gemmaforge.errors import GemmaforgeError
from gemmaforge.tokenizer import load_tokenizer

# Chosen to exercise every rule of Gemma's tokenizer: no dummy prefix (leading spaces), whitespace-run
# tokens, user-defined newline tokens, byte fallback (rare CJK, emoji), special-token strings.
# None contains "▁" (U+2581): SentencePiece decodes it as a space, so it cannot round-trip.
TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "runs  of   spaces    between     words",
    "a" + " " * 40 + "b",
    "line one\nline two\n\nparagraph\n\n\n\nfour newlines",
    "\n",
    "tabs\tbetween\t\twords\n\tindented",
    "Windows line\r\nendings\r\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }  // C++\n",
    "我们今天去公园散步，天气很好。",
    "龘靐齉爩",  # rare characters: spelled with byte-fallback tokens
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "Привет, как дела? Съешь же ещё этих мягких французских булок.",
    "café, niño, über, naïve, façade, Ångström, crème brûlée",
    "مرحبا بالعالم، كيف حالك؟",
    "עברית וגם ελληνικά και हिन्दी",
    "emoji 😀🎉👍🏽 and flags 🇫🇷🇯🇵",
    "ZWJ sequences: 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "text with <bos> and <eos> and <pad> inside",
    "<table><tr><td>cell</td></tr></table>",
    "numbers 1234567890 3.14159 -42 1e-9",
    "mixed: English, 中文, русский, العربية, 🎉 in one line",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "~!@#$%^&*()_+`-=[]{}|;':\",./<>?\\",
]


@pytest.fixture(scope="module")
def gguf_path(embedded_gguf) -> Path:
    return embedded_gguf


@pytest.fixture(scope="module")
def tok(gguf_path):
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    """transformers' tokenizer built from the same GGUF: the reference.

    ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` picks ``GemmaTokenizer`` for this file and then
    builds exactly this; asking for the class directly skips AutoTokenizer's reading of the model config
    through gguf.GGUFReader, which takes 20-40 s here and plays no part in the tokenizer.
    """
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    assert TOKENIZER_MAPPING_NAMES["gemma3"] == "GemmaTokenizer"
    return transformers.GemmaTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


# ---- the embedded GGUF against transformers ------------------------------------------------------


def test_special_ids_of_gemma3_vocab(tok):
    # docs/reference.md §4
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert tok.stop_ids == frozenset({1, 106})
    assert tok.vocab_size == 262144
    assert tok.family_hint == "gemma3"
    assert tok.token_to_id("<end_of_turn>") == 106 and tok.id_to_token(106) == "<end_of_turn>"
    assert tok.token_to_id("no such token") is None
    assert tok.is_special(106) and not tok.is_special(107)


def test_ids_match_transformers(tok, hf_tok):
    mismatches = [t for t in TEXTS if tok.encode(t) != hf_tok(t)["input_ids"]]
    assert not mismatches
    without_bos = [t for t in TEXTS if tok.encode(t, add_bos=False) != hf_tok(t, add_special_tokens=False)["input_ids"]]
    assert not without_bos


def test_ids_match_transformers_on_a_long_mixed_text(tok, hf_tok):
    rng = random.Random(0)
    text = "".join(rng.choice(TEXTS[1:]) + rng.choice([" ", "\n", "", "  "]) for _ in range(300))
    assert tok.encode(text) == hf_tok(text)["input_ids"]


def test_bos_once_and_never_eos(tok):
    for text in ("hello", ""):
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
        assert tok.eos_id not in ids
    assert tok.encode("") == [tok.bos_id] and tok.encode("", add_bos=False) == []
    # no dummy prefix: a leading space is a token of its own, not absorbed silently
    assert tok.encode("hi", add_bos=False) != tok.encode(" hi", add_bos=False)


def test_special_token_strings_become_single_ids(tok):
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>\n", add_bos=False)
    assert ids[0] == tok.start_of_turn_id and tok.end_of_turn_id in ids


def test_encode_batch_equals_encode(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS, add_bos=False) == [tok.encode(t, add_bos=False) for t in TEXTS]


def test_decode_round_trips_and_matches_transformers(tok, hf_tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids[1:]) == text
        assert tok.decode(ids) == "<bos>" + text
        assert tok.decode(ids) == hf_tok.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_rare_characters_use_byte_fallback(tok):
    ids = tok.encode("龘", add_bos=False)
    assert [tok.id_to_token(i) for i in ids] == ["<0xE9>", "<0xBE>", "<0x98>"]


# ---- streaming -----------------------------------------------------------------------------------


def _stream(tok, ids, **kwargs) -> list[str]:
    stream = tok.stream_decoder(**kwargs)
    pieces = [stream.feed(i) for i in ids]
    return pieces + [stream.flush()]


def test_stream_pieces_concatenate_to_decode(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)
        # valid text never produces a replacement character, so no piece was cut inside a character
        assert not any("\ufffd" in p for p in pieces)
        assert pieces[-1] == ""  # nothing left over at the end of valid text
        assert "".join(_stream(tok, ids, skip_special_tokens=True)) == tok.decode(ids, skip_special_tokens=True)


def test_stream_holds_bytes_until_the_character_is_complete(tok):
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in "你".encode()]
    stream = tok.stream_decoder()
    assert [stream.feed(i) for i in byte_ids] == ["", "", "你"]
    # an incomplete character is released by the next ordinary token (as U+FFFD), or by flush()
    assert stream.feed(byte_ids[0]) == ""
    assert stream.feed(tok.token_to_id("a")) == "\ufffda"
    assert stream.feed(byte_ids[0]) == "" and stream.flush() == "\ufffd" and stream.flush() == ""


def test_stream_equals_decode_on_random_ids_including_invalid_bytes(tok):
    rng = random.Random(1)
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    for _ in range(200):
        ids = [rng.choice(byte_ids) if rng.random() < 0.7 else rng.randrange(tok.vocab_size) for _ in range(20)]
        assert "".join(_stream(tok, ids)) == tok.decode(ids)
    # a run of byte tokens decodes like Python's bytes.decode(errors="replace"), as SentencePiece does
    raw = bytes(rng.randrange(256) for _ in range(64))
    assert tok.decode([byte_ids[b] for b in raw]) == raw.decode("utf-8", errors="replace")


# ---- speed ---------------------------------------------------------------------------------------


def test_encode_one_megabyte_round_trips(tok):
    """A long input goes through in one call (speed is measured outside tests: ~0.4 s for this 1 MB)."""
    block = "\n".join(TEXTS[1:]).replace("<", "(")
    text = (block * (1_000_000 // len(block) + 1))[:1_000_000]
    ids = tok.encode(text)
    assert len(ids) > 100_000
    assert tok.decode(ids[1:]) == text


# ---- other sources -------------------------------------------------------------------------------


def test_tokenizer_json_from_transformers(tok, hf_tok, tmp_path):
    hf_tok.save_pretrained(tmp_path)
    from_dir = load_tokenizer(tmp_path)
    from_file = load_tokenizer(tmp_path / "tokenizer.json")
    for loaded in (from_dir, from_file):
        assert (loaded.bos_id, loaded.eos_id, loaded.stop_ids, loaded.vocab_size) == (2, 1, frozenset({1, 106}), 262144)
        assert loaded.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
        assert [loaded.decode(loaded.encode(t)) for t in TEXTS] == [tok.decode(tok.encode(t)) for t in TEXTS]


def _train_sentencepiece(directory: Path, **overrides) -> Path:
    """A tiny Gemma-style SentencePiece BPE model: byte fallback, no dummy prefix, no normalization."""
    spm = pytest.importorskip("sentencepiece")
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "def f(x):\n    return x + 1",
        "\tindented with a tab",
        "Ünïcödé café naïve façade 1234567890",
        "hello world  two  spaces   three",
        "Привет мир",
    ] * 20
    options = dict(
        model_type="bpe", vocab_size=400, byte_fallback=True, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", control_symbols=["<start_of_turn>", "<end_of_turn>"], user_defined_symbols=["\n\n"],
        minloglevel=2,
    )
    options.update(overrides)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(directory / "tokenizer"), **options)
    return directory / "tokenizer.model"


def test_sentencepiece_model_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    path = _train_sentencepiece(tmp_path)
    reference = spm.SentencePieceProcessor(model_file=str(path))
    ours = load_tokenizer(path)
    assert load_tokenizer(tmp_path).source == ours.source  # a directory holding tokenizer.model
    assert (ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id) == (0, 1, 2, 3)
    assert ours.stop_ids == frozenset({1, ours.token_to_id("<end_of_turn>")})
    # SentencePiece treats control-token strings in text as plain text; skip those texts here
    texts = [t for t in TEXTS if "<" not in t] + ["the lazy fox\n\nquick", "x" * 100]
    for text in texts:
        ids = ours.encode(text)
        assert ids == [2, *reference.encode(text)], text
        assert ours.decode(ids[1:]) == reference.decode(ids[1:]) == text


# ---- errors --------------------------------------------------------------------------------------


def _assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(GemmaforgeError) as error:
        load_tokenizer(path)
    _assert_one_line_naming(error, path)


def test_directory_without_a_tokenizer(tmp_path):
    with pytest.raises(GemmaforgeError) as error:
        load_tokenizer(tmp_path)
    _assert_one_line_naming(error, tmp_path)


def test_unrecognised_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x01\x02\x03" * 10)
    with pytest.raises(GemmaforgeError) as error:
        load_tokenizer(path)
    _assert_one_line_naming(error, path)


def test_unigram_sentencepiece_model_is_refused(tmp_path):
    path = _train_sentencepiece(tmp_path, model_type="unigram", hard_vocab_limit=False)
    with pytest.raises(GemmaforgeError, match="unigram") as error:
        load_tokenizer(path)
    _assert_one_line_naming(error, path)


def test_dummy_prefix_sentencepiece_model_is_refused(tmp_path):
    path = _train_sentencepiece(tmp_path, add_dummy_prefix=True)
    with pytest.raises(GemmaforgeError, match="dummy") as error:
        load_tokenizer(path)
    _assert_one_line_naming(error, path)


def test_garbage_tokenizer_model(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(GemmaforgeError) as error:
        load_tokenizer(path)
    _assert_one_line_naming(error, path)


def test_non_bpe_tokenizer_json_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>")).save(str(path))
    with pytest.raises(GemmaforgeError, match="WordLevel") as error:
        load_tokenizer(path)
    _assert_one_line_naming(error, path)


def test_broken_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(GemmaforgeError) as error:
        load_tokenizer(path)
    _assert_one_line_naming(error, path)


def test_truncated_gguf(gguf_path, tmp_path):
    path = tmp_path / "cut.gguf"
    with gguf_path.open("rb") as f:
        path.write_bytes(f.read(100_000))  # stops inside the vocabulary
    with pytest.raises(GemmaforgeError, match="truncated") as error:
        load_tokenizer(path)
    _assert_one_line_naming(error, path)


def test_gguf_without_sentencepiece_vocab(tmp_path):
    path = tmp_path / "gpt2.gguf"
    path.write_bytes(_tiny_gguf({"general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
                                 "tokenizer.ggml.tokens": ["a", "b"]}))
    with pytest.raises(GemmaforgeError, match="gpt2") as error:
        load_tokenizer(path)
    _assert_one_line_naming(error, path)


def _tiny_gguf(metadata: dict) -> bytes:
    """A GGUF v3 file with only string / string-array metadata and no tensors."""
    def string(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<Q", len(raw)) + raw

    out = [b"GGUF", struct.pack("<IQQ", 3, 0, len(metadata))]
    for key, value in metadata.items():
        out.append(string(key))
        if isinstance(value, list):
            out.append(struct.pack("<IIQ", 9, 8, len(value)) + b"".join(string(v) for v in value))
        else:
            out.append(struct.pack("<I", 8) + string(value))
    return b"".join(out)


# ---- what loading a tokenizer imports --------------------------------------------------------------

# Run in a fresh interpreter. gemmaforge/__init__.py re-exports load, Gemma, generate... and so imports
# all of them; a bare package object in its place shows what the tokenizer module itself pulls in.
# sentencepiece is blocked: the library reads tokenizer.model without it (it is a test-only dependency).
_ISOLATED = """
import json, sys, types
package = types.ModuleType("gemmaforge")
package.__path__ = [{src!r}]
sys.modules["gemmaforge"] = package
sys.modules["sentencepiece"] = None
from gemmaforge.tokenizer import load_tokenizer
tok = load_tokenizer({path!r})
heavy = sorted(name for name, module in sys.modules.items() if module is not None and (
    name in ("gemmaforge.checkpoint", "gemmaforge.model") or name.split(".")[0] in ("torch", "gguf", "sentencepiece")))
print(json.dumps({{"ids": tok.encode({text!r}), "heavy": heavy}}))
"""


def _load_in_fresh_interpreter(path: Path, text: str) -> dict:
    import subprocess
    import sys

    import gemmaforge.tokenizer

    src = str(Path(gemmaforge.tokenizer.__file__).parent)
    code = _ISOLATED.format(src=src, path=str(path), text=text)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_gguf_tokenizer_imports_neither_checkpoint_nor_model(tmp_path):
    """Reading a GGUF's vocabulary needs its header only: not torch, the model or the checkpoint package."""
    path = tmp_path / "vocab.gguf"
    path.write_bytes(_tiny_gguf({"general.architecture": "gemma3", "tokenizer.ggml.model": "llama",
                                 "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<unk>", "h", "i", "hi"]}))
    child = _load_in_fresh_interpreter(path, "hihi")
    assert child["heavy"] == []
    assert child["ids"] == load_tokenizer(path).encode("hihi") == [2, 6, 6]


def test_sentencepiece_model_loads_without_sentencepiece(tmp_path):
    path = _train_sentencepiece(tmp_path)  # training needs sentencepiece; reading must not
    text = "The quick brown fox\n\nПривет"
    child = _load_in_fresh_interpreter(path, text)
    assert child["heavy"] == []
    assert child["ids"] == load_tokenizer(path).encode(text)


def test_merges_are_cached_on_disk_by_vocabulary(tmp_path, monkeypatch):
    """The merges recovered from a vocabulary are written once and read back by later loads; another
    vocabulary gets its own file, and an unreadable file is rebuilt, not trusted."""
    from gemmaforge import tokenizer as T

    monkeypatch.setenv("GEMMAFORGE_CACHE", str(tmp_path))
    tokens = ["<unk>", "a", "b", "ab", "c", "abc", "bc"]
    vocab = {t: i for i, t in enumerate(tokens)}
    expected = T._merges_by_position(vocab)
    assert expected == [("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c")]
    assert T._cached_merges(tokens, vocab) == expected
    (cached,) = (tmp_path / "tokenizers").iterdir()
    calls = []
    monkeypatch.setattr(T, "_merges_by_position", lambda v: calls.append(v) or expected)
    assert T._cached_merges(tokens, vocab) == expected and not calls  # read back, not rebuilt
    other = tokens + ["ca"]
    T._cached_merges(other, {t: i for i, t in enumerate(other)})
    assert len(calls) == 1 and len(list((tmp_path / "tokenizers").iterdir())) == 2
    cached.write_bytes(b"\x00 not marshal")
    assert T._cached_merges(tokens, vocab) == expected and len(calls) == 2
