"""Gemma's tokenizer: SentencePiece BPE with byte fallback, run by the Rust ``tokenizers`` library.

Gemma 2 and Gemma 3 both use a SentencePiece BPE vocabulary with these rules (docs/reference.md §4):

- spaces become ``▁`` and there is no dummy prefix: ``"hi"`` and ``" hi"`` tokenize differently;
- a character the vocabulary lacks is spelled as its UTF-8 bytes, one ``<0xNN>`` token per byte
  (byte fallback), so nothing ever becomes ``<unk>``;
- control tokens (``<bos>``, ``<start_of_turn>``, ...) and user-defined tokens (``"\\n\\n"``, ``<table>``)
  are matched whole wherever they appear in the text;
- ``<bos>`` is prepended, ``<eos>`` never appended.

Every source is turned into the same ``tokenizers.Tokenizer``: a GGUF file and a SentencePiece
``tokenizer.model`` both give us a list of (piece, type), from which we build the BPE model exactly as
transformers' GGUF loader does (so ids match ``AutoTokenizer.from_pretrained(..., gguf_file=...)``);
an HF ``tokenizer.json`` already is one.

Decoding is done here in Python rather than by the ``tokenizers`` decoder, so that ``decode`` and the
streaming decoder share one definition and ``"".join(stream pieces) == decode(ids)`` holds by
construction. Invalid byte sequences become U+FFFD the way Python's ``errors="replace"`` does it (as
SentencePiece does); on valid text this is identical to transformers' decoding.
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import normalizers
from tokenizers.models import BPE

from .errors import GemmaforgeError

# SentencePiece piece types; GGUF's `tokenizer.ggml.token_type` uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # "▁", SentencePiece's visible space


class Tokenizer:
    """Text <-> token ids for a Gemma vocabulary. Build one with :func:`load_tokenizer`.

    Attributes: ``bos_id``, ``eos_id``, ``pad_id``, ``unk_id``, ``start_of_turn_id``, ``end_of_turn_id``
    (None if the vocabulary lacks them), ``stop_ids`` (ids that end generation), ``vocab_size``,
    ``family_hint`` ("gemma2", "gemma3" or None), ``source`` (the file it was read from).
    """

    def __init__(self, backend: RustTokenizer, *, source: str, special_ids: dict[str, int | None] | None = None,
                 family_hint: str | None = None, tokens: Sequence[str] | None = None):
        """``tokens``: the vocabulary in id order, when the caller built ``backend`` from it (a GGUF
        or SentencePiece source): reading it back from the backend costs ~0.3 s for 262k tokens."""
        self._backend = backend
        self.source = source

        if tokens is None:
            vocab = backend.get_vocab(with_added_tokens=True)
            tokens = [""] * (max(vocab.values()) + 1 if vocab else 0)
            for token, index in vocab.items():
                tokens[index] = token
        self.vocab_size = len(tokens)
        self._tokens = tokens
        # id -> what it decodes to, filled as ids are decoded (all 262k up front: ~0.15 s of every load)
        self._pieces: dict[int, str | int] = {}
        self._special: frozenset[int] = frozenset(
            index for index, token in backend.get_added_tokens_decoder().items() if token.special
        )

        ids = dict(special_ids or {})
        for name, token in (("bos", "<bos>"), ("eos", "<eos>"), ("pad", "<pad>"), ("unk", "<unk>")):
            if ids.get(name) is None:
                ids[name] = self.token_to_id(token)
        if ids["bos"] is None or ids["eos"] is None:
            raise GemmaforgeError(f"tokenizer {source} has no <bos>/<eos> token: is this a Gemma tokenizer?")
        self.bos_id: int = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.pad_id: int | None = ids["pad"]
        self.unk_id: int | None = ids["unk"]
        self.start_of_turn_id: int | None = self.token_to_id("<start_of_turn>")
        self.end_of_turn_id: int | None = self.token_to_id("<end_of_turn>")
        # Instruction-tuned models end a reply with <end_of_turn>, pre-trained ones with <eos>. The id
        # of <end_of_turn> differs by family (107 in Gemma 2, 106 in Gemma 3), so look it up.
        self.stop_ids: frozenset[int] = frozenset(
            i for i in (self.eos_id, self.end_of_turn_id) if i is not None
        )
        # The same difference tells the families apart when the file does not say (docs/reference.md §4).
        self.family_hint: str | None = family_hint or {107: "gemma2", 106: "gemma3"}.get(self.end_of_turn_id)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, family_hint={self.family_hint!r})"

    # ---- encoding ----------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [[self.bos_id, *e.ids] if add_bos else e.ids for e in encodings]

    # ---- decoding ----------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``. Ids outside the vocabulary (e.g. the padding rows of a Gemma 2 JAX
        checkpoint's 256128-row embedding) decode to nothing, as in transformers."""
        stream = self.stream_decoder(skip_special_tokens=skip_special_tokens)
        return "".join(stream.feed(i) for i in ids) + stream.flush()

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- vocabulary --------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def piece(self, index: int) -> str | int:
        """What id ``index`` decodes to: its text, the byte of a byte-fallback token ``<0xNN>`` (an
        int), or "" for an id outside the vocabulary."""
        piece = self._pieces.get(index)
        if piece is None:
            if not 0 <= index < self.vocab_size:
                return ""
            token = self._tokens[index]
            byte = _byte_value(token)
            piece = self._pieces[index] = token.replace(SPACE, " ") if byte is None else byte
        return piece

    def id_to_token(self, index: int) -> str | None:
        return self._backend.id_to_token(index)

    def is_special(self, index: int) -> bool:
        return index in self._special

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as an HF ``tokenizer.json`` (atomically), e.g. next to a converted model."""
        from .atomic import write_text

        write_text(path, self._backend.to_str(pretty=True))


class StreamDecoder:
    """Decode ids one at a time, for printing a reply while it is generated.

    ``feed(id)`` returns the text that is now certain (possibly ""). A character spelled with several
    byte-fallback tokens (``<0xE4><0xBD><0xA0>`` = "你") is held back until its last byte arrives, so no
    returned piece ends inside a character. ``flush()`` returns whatever is still held (an incomplete
    sequence becomes U+FFFD). Concatenating every piece equals ``tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._piece = tokenizer.piece
        self._skip = tokenizer._special if skip_special_tokens else frozenset()
        # Python's incremental UTF-8 decoder gives the same result fed byte by byte as all at once,
        # which is exactly the streaming guarantee we need.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, index: int) -> str:
        if index in self._skip:
            # transformers drops skipped tokens before decoding, so a byte run continues across them
            return ""
        piece = self._piece(index)
        if isinstance(piece, int):
            return self._utf8.decode(bytes((piece,)))
        return self.flush() + piece

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _byte_value(token: str) -> int | None:
    """255 for the byte-fallback token "<0xFF>", None for every other token."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


# ---- loading ---------------------------------------------------------------------------------------


def load_tokenizer(source: str | Path | None = None) -> Tokenizer:
    """The tokenizer in ``source``: a ``.gguf`` file, a SentencePiece ``tokenizer.model``, an HF
    ``tokenizer.json``, a directory holding one of the last two, or None for the embedded default model."""
    if source is None:
        from .default_model import default_model_path

        source = default_model_path()
    path = Path(source)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise GemmaforgeError(
                f"directory {path} has no tokenizer.json or tokenizer.model: pass the tokenizer file or a .gguf"
            )
    if not path.is_file():
        raise GemmaforgeError(f"tokenizer file {path} does not exist: pass a .gguf, tokenizer.model or tokenizer.json")
    stat = path.stat()
    return _load_file(path.resolve(), stat.st_mtime_ns, stat.st_size)


# Building the BPE model from a 262k-token vocabulary takes a few seconds, and a process (a test run, an
# evaluation) often asks for the same tokenizer repeatedly. A Tokenizer is never modified after it is
# built, so sharing one is safe; the file's mtime and size are in the key so an edited file is re-read.
@functools.lru_cache(maxsize=4)
def _load_file(path: Path, _mtime_ns: int, _size: int) -> Tokenizer:
    with path.open("rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return _from_gguf(path)
    if path.suffix == ".json" or head.lstrip()[:1] == b"{":
        return _from_tokenizer_json(path)
    if path.suffix == ".model":
        return _from_sentencepiece(path)
    raise GemmaforgeError(
        f"{path} is not a tokenizer gemmaforge can read: "
        "pass a .gguf, a SentencePiece tokenizer.model or a tokenizer.json"
    )


def _from_gguf(path: Path) -> Tokenizer:
    # gguf_file, not checkpoint.gguf: reading a vocabulary should not import torch and the model.
    from .gguf_file import read_gguf_metadata

    meta = read_gguf_metadata(path)
    if "tokenizer.ggml.tokens" not in meta:
        raise GemmaforgeError(f"{path} carries no tokenizer (no tokenizer.ggml.tokens): pass a tokenizer file too")
    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":  # llama.cpp's name for a SentencePiece vocabulary
        raise GemmaforgeError(
            f"{path} has tokenizer.ggml.model={kind!r}, not a SentencePiece ('llama') vocabulary: "
            "is this a Gemma 2/3 GGUF?"
        )
    if meta.get("tokenizer.ggml.add_space_prefix"):
        raise GemmaforgeError(
            f"{path} asks for a dummy-prefix space, which Gemma tokenizers never use: is this a Gemma GGUF?"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    special_ids = {
        "bos": meta.get("tokenizer.ggml.bos_token_id"),
        "eos": meta.get("tokenizer.ggml.eos_token_id"),
        "pad": meta.get("tokenizer.ggml.padding_token_id"),
        "unk": meta.get("tokenizer.ggml.unknown_token_id"),
    }
    architecture = meta.get("general.architecture")
    return Tokenizer(
        _build_sentencepiece_bpe(tokens, types, byte_fallback=True),
        source=str(path),
        special_ids=special_ids,
        family_hint=architecture if architecture in ("gemma2", "gemma3") else None,
        tokens=tokens,
    )


def _from_tokenizer_json(path: Path) -> Tokenizer:
    try:
        backend = RustTokenizer.from_file(str(path))
    except Exception as e:  # the Rust error is a plain Exception with a serde message
        raise GemmaforgeError(f"cannot read tokenizer {path} ({e}): is it a Hugging Face tokenizer.json?") from None
    if not isinstance(backend.model, BPE):
        kind = type(backend.model).__name__
        raise GemmaforgeError(f"{path} holds a {kind} tokenizer, not Gemma's BPE: is this a Gemma tokenizer.json?")
    return Tokenizer(backend, source=str(path))


def _from_sentencepiece(path: Path) -> Tokenizer:
    model = _read_sentencepiece_model(path)
    problem = None
    if model["model_type"] != 2:
        problem = "is a unigram model, not BPE" if model["model_type"] == 1 else f"has model_type {model['model_type']}"
    elif model["add_dummy_prefix"]:
        problem = "adds a dummy-prefix space (add_dummy_prefix=true)"
    elif model["remove_extra_whitespaces"]:
        problem = "collapses whitespace (remove_extra_whitespaces=true)"
    elif model["normalizer"] not in ("identity", ""):
        problem = f"normalizes text ({model['normalizer']})"
    if problem:
        raise GemmaforgeError(f"SentencePiece model {path} {problem}, unlike Gemma's: use a Gemma tokenizer.model")
    pieces, types = model["pieces"], model["types"]
    special_ids = {name: model[f"{name}_id"] if 0 <= model[f"{name}_id"] < len(pieces) else None
                   for name in ("bos", "eos", "pad", "unk")}
    return Tokenizer(
        _build_sentencepiece_bpe(pieces, types, byte_fallback=model["byte_fallback"]),
        source=str(path),
        special_ids=special_ids,
        tokens=pieces,
    )


# ---- building the BPE model ------------------------------------------------------------------------


def _build_sentencepiece_bpe(tokens: Sequence[str], types: Sequence[int], *, byte_fallback: bool) -> RustTokenizer:
    """A ``tokenizers`` BPE equivalent to a SentencePiece BPE vocabulary.

    Mirrors transformers' ``gemma_tokenizer`` (integrations/gguf/gguf_tokenizer_mapping.py), so our ids
    match ``AutoTokenizer.from_pretrained(..., gguf_file=...)``.
    """
    # GGUF files store the whitespace-run tokens ("  ", "   ", ...) with real spaces, but the normalizer
    # below turns spaces into "▁" before the BPE model sees them, so they must be spelled with "▁".
    tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}

    backend = RustTokenizer(
        BPE(vocab=vocab, merges=_cached_merges(tokens, vocab), unk_token="<unk>" if "<unk>" in vocab else None,
            fuse_unk=True, byte_fallback=byte_fallback)
    )
    # No dummy prefix (docs/reference.md §4): only replace spaces. transformers also declares a
    # Split(" ") pre-tokenizer, but it runs after this normalizer has replaced every space, so it never
    # splits anything; we leave it out.
    backend.normalizer = normalizers.Replace(" ", SPACE)
    # Control tokens (<bos>, <start_of_turn>, <unusedN>) are special: decode(skip_special_tokens=True)
    # drops them. User-defined ones ("\n\n", "<table>") are ordinary text that must stay whole. Both are
    # matched in the raw text before normalization (normalized=False), as SentencePiece matches them.
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL]
    )
    # The whitespace runs are user-defined too, but transformers leaves them to the merges (it looks
    # them up by their GGUF spelling and misses); we do the same so that our ids match its ids.
    backend.add_tokens(
        [AddedToken(t, normalized=False, special=False)
         for t, k in zip(tokens, types) if k == USER_DEFINED and t.strip(SPACE)]
    )
    return backend


def _cached_merges(tokens: Sequence[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """``_merges_by_position(vocab)``, kept on disk for the next process.

    Recovering Gemma's ~515k merges takes ~0.65 s of Python, a quarter of a short ``gemmaforge
    generate``; reading them back takes ~0.15 s. The key is the vocabulary itself (every token, in
    order), this module's source and the Python version (marshal's format); the file is written
    atomically, and a cache that cannot be written (read-only home) is skipped."""
    import hashlib
    import marshal
    import sys

    from .atomic import write_bytes
    from .default_model import cache_dir

    digest = hashlib.sha256("\0".join([*tokens, Path(__file__).read_text(), sys.version]).encode()).hexdigest()
    path = cache_dir() / "tokenizers" / f"merges-{digest[:20]}.marshal"
    try:
        merges = marshal.loads(path.read_bytes())
        if isinstance(merges, list):
            return merges
    except (OSError, EOFError, ValueError, TypeError):  # absent, or not a marshal file of this Python
        pass
    merges = _merges_by_position(vocab)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, marshal.dumps(merges))
    except OSError:
        pass
    return merges


def _merges_by_position(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges recovered from a vocabulary that lists no merges.

    Every way of cutting a token into two tokens of the vocabulary is a merge that produces it. A
    SentencePiece BPE vocabulary is stored in the order its merges were learned, so a token earlier in
    the list is a higher-priority merge (Gemma's scores do not follow that order; positions do). Ties
    between cuts of one token go to the longer left part, as in transformers' ``generate_merges``.
    """
    ranked = []
    for token, index in vocab.items():
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((index, left, right))
    ranked.sort(key=lambda m: m[0])  # stable: keeps the longer-left-first order within a token
    return [(left, right) for _, left, right in ranked]


# ---- reading the files -----------------------------------------------------------------------------

def _read_sentencepiece_model(path: Path) -> dict:
    """The parts of a SentencePiece ``ModelProto`` we need, read straight from the protobuf wire format.

    Avoids a protobuf dependency. Field numbers and defaults are those of sentencepiece_model.proto:
    ModelProto{1: pieces, 2: trainer_spec, 3: normalizer_spec}; SentencePiece{1: piece, 2: score, 3: type};
    TrainerSpec{3: model_type, 35: byte_fallback, 40-43: unk/bos/eos/pad ids};
    NormalizerSpec{1: name, 3: add_dummy_prefix, 4: remove_extra_whitespaces}.
    """
    data = path.read_bytes()
    model = {
        "pieces": [], "types": [], "model_type": 1, "byte_fallback": False,
        "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
        "normalizer": "", "add_dummy_prefix": True, "remove_extra_whitespaces": True,
    }
    trainer_fields = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    normalizer_fields = {1: "normalizer", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces"}
    try:
        for field, value in _protobuf_fields(data):
            if field == 1:
                piece = dict(_protobuf_fields(value))
                model["pieces"].append(piece.get(1, b"").decode("utf-8"))
                model["types"].append(piece.get(3, NORMAL))
            elif field in (2, 3):
                names = trainer_fields if field == 2 else normalizer_fields
                for sub, sub_value in _protobuf_fields(value):
                    if sub in names:
                        model[names[sub]] = sub_value.decode("utf-8") if isinstance(sub_value, bytes) else sub_value
    except (IndexError, ValueError, UnicodeDecodeError):
        raise GemmaforgeError(f"{path} is not a SentencePiece model file: pass Gemma's tokenizer.model") from None
    for name in ("byte_fallback", "add_dummy_prefix", "remove_extra_whitespaces"):
        model[name] = bool(model[name])
    for name in ("bos_id", "eos_id", "unk_id", "pad_id"):
        if model[name] >= 1 << 63:  # int32 fields set to -1 arrive as 64-bit two's complement varints
            model[name] -= 1 << 64
    if not model["pieces"]:
        raise GemmaforgeError(f"{path} holds no vocabulary: pass Gemma's tokenizer.model")
    return model


def _protobuf_fields(data: bytes):
    """Yield (field number, value) for one protobuf message: ints for varints, bytes for
    length-delimited fields, raw 4/8-byte chunks for fixed-width ones."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
            if pos > len(data):
                raise ValueError("field runs past the end")
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = data[pos : pos + width], pos + width
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
