"""Token data: ``prepare_data`` turns text into memory-mapped token shards; ``PackedWindows`` reads them.

On disk (one directory per prepared corpus)::

    meta.json                  written last: its presence means "complete"
    tokenizer.json             the tokenizer the ids belong to (students save it with their weights)
    train-00000.bin ...        flat little-endian uint16/uint32 token ids, documents back to back,
    val-00000.bin ...          each document starting with <bos> (the document boundary)
    progress.json              resume point while preparing

Documents go to the validation split by index (every ~1/val_fraction-th document), so the split
is deterministic and spread over the corpus. Shards are cut at document boundaries every
``shard_tokens`` tokens, and after each shard ``progress.json`` records how many documents are done,
so an interrupted run resumes where it stopped and produces byte-identical files.

Training reads fixed-length windows of the concatenated token stream ("packing"). Every window's
first input is replaced by <bos>: Gemma needs a <bos> at the start of every context (docs/reference.md
section 4), and a window usually starts mid-document. The replaced token is still a *label* (the
last one of the previous window), so every token but the very first is predicted exactly once per
epoch. Labels that are <bos> are ignored: nothing in a document predicts where the next one starts.

A window holds several documents. With ``packing="segments"`` (the default) each one is a segment of
its own: a token attends only to earlier tokens of its document, and positions restart at 0 at each
<bos>, so a document is seen exactly as if it were alone in its context (this is how Gemma was trained
on packed data). The <bos> tokens are the only separators in the stream (there is no <eos> between
documents), so they are what cuts segments. ``packing="concat"`` is plain causal attention over the
whole window, positions 0 .. T-1.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .. import atomic
from ..errors import GemmaforgeError
from .batches import IGNORE, Batch, EpochOrder, IndexedSource, evenly_spaced

FORMAT = "gemmaforge-tokens-v1"
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
PACKING = ("segments", "concat")


# ---- small file helpers ------------------------------------------------------------------------
def tokenizer_digest(tokenizer) -> str:
    """A fingerprint of the vocabulary: two tokenizers with the same digest give the same ids."""
    h = hashlib.sha256()
    for i in range(tokenizer.vocab_size):
        h.update((tokenizer.id_to_token(i) or "").encode() + b"\0")
    return h.hexdigest()


# ---- reading documents ---------------------------------------------------------------------------
def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; directories expanded to their supported files, sorted (deterministic order)."""
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            if not found:
                raise GemmaforgeError(f"directory {p} has no {', '.join(suffixes)} files: nothing to tokenize")
            files.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in suffixes:
                raise GemmaforgeError(f"{p}: unsupported file type {p.suffix!r}; use {', '.join(suffixes)}")
            files.append(p)
        else:
            raise GemmaforgeError(f"input {p} does not exist: check the path")
    return files


def read_documents(files: Sequence[Path], field: str = "text") -> Iterator[str]:
    """Yield documents: a text file is one document, a JSONL line or parquet row is one (``field``)."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            yield path.read_text(encoding="utf-8", errors="replace")
        elif suffix in JSONL_SUFFIXES:
            for n, row in read_jsonl(path):
                if field not in row:
                    raise GemmaforgeError(f"{path} line {n} has no field {field!r}: pass --field NAME")
                yield str(row[field])
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise GemmaforgeError("reading parquet needs pyarrow: pip install pyarrow") from None
            pf = pq.ParquetFile(path)
            if field not in pf.schema_arrow.names:
                raise GemmaforgeError(f"{path} has no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}): pass --field NAME")
            for batch in pf.iter_batches(columns=[field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    yield "" if value is None else str(value)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; a line that is not a JSON
    object is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise GemmaforgeError(f"{path} does not exist: pass a JSONL file")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GemmaforgeError(f"{path} line {n} is not valid JSON ({e.msg}): fix or remove it") from None
            if not isinstance(row, dict):
                raise GemmaforgeError(f"{path} line {n} is a JSON {type(row).__name__}, not an object: fix or remove it")
            yield n, row


def is_val_doc(index: int, val_fraction: float) -> bool:
    """Document i is held out iff floor((i + 1) f) > floor(i f): exactly floor(n f) of n, evenly spaced."""
    return evenly_spaced(index, val_fraction)


# ---- writing shards -------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Buffers tokenized documents per split and writes a shard pair every ``shard_tokens`` tokens."""

    def __init__(self, out: Path, vocab_size: int, shard_tokens: int, state: dict | None = None):
        self.out, self.dtype, self.shard_tokens = out, token_dtype(vocab_size), shard_tokens
        self.state = state or {"docs_done": 0, "chunks": 0,
                               "splits": {s: {"files": [], "tokens": 0, "docs": 0} for s in ("train", "val")}}
        self.buffers: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        self.buffered_docs = {"train": 0, "val": 0}
        self.buffered_tokens = 0

    def add(self, split: str, ids: Sequence[int]) -> None:
        self.buffers[split].append(np.asarray(ids, dtype=self.dtype))
        self.buffered_docs[split] += 1
        self.buffered_tokens += len(ids)
        if self.buffered_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Write the buffered documents, then record the resume point (files first, state last)."""
        if not self.buffered_tokens and not any(self.buffered_docs.values()):
            return
        chunk = self.state["chunks"]
        for split, parts in self.buffers.items():
            if not parts:
                continue
            name = f"{split}-{chunk:05d}.bin"
            tokens = np.concatenate(parts)
            atomic.write_bytes(self.out / name, tokens.tobytes())
            info = self.state["splits"][split]
            info["files"].append(name)
            info["tokens"] += int(tokens.size)
            info["docs"] += self.buffered_docs[split]
        self.state["docs_done"] += sum(self.buffered_docs.values())
        self.state["chunks"] = chunk + 1
        self.buffers = {"train": [], "val": []}
        self.buffered_docs = {"train": 0, "val": 0}
        self.buffered_tokens = 0
        atomic.write_json(self.out / "progress.json", self.state)


def _fingerprint(files: Sequence[Path], tok_digest: str, field: str, val_fraction: float, shard_tokens: int) -> str:
    desc = {
        "format": FORMAT,
        "inputs": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "tokenizer": tok_digest, "field": field, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def prepare_out_dir(out: Path) -> None:
    """Create ``out`` or fail with one line, before any slow work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise GemmaforgeError(f"cannot write to output directory {out} ({e.strerror or e}): choose another --out") from None


def prepare_data(inputs: Sequence[str | Path], out: str | Path, tokenizer_source=None, *, field: str = "text",
                 val_fraction: float = 0.01, shard_tokens: int = 1 << 24, batch_docs: int = 256,
                 progress: bool = True) -> dict:
    """Tokenize ``inputs`` into ``out``; resumes an interrupted run with the same arguments. Returns meta."""
    from tqdm import tqdm

    from ..tokenizer import load_tokenizer

    if not 0.0 < val_fraction < 1.0:
        raise GemmaforgeError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if shard_tokens < 1:
        raise GemmaforgeError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    files = expand_inputs(inputs)
    out = Path(out)
    prepare_out_dir(out)
    # A Tokenizer instance is accepted as is (tests share one instead of re-reading the GGUF).
    tok = tokenizer_source if hasattr(tokenizer_source, "encode_batch") else load_tokenizer(tokenizer_source)
    digest = tokenizer_digest(tok)
    fingerprint = _fingerprint(files, digest, field, val_fraction, shard_tokens)

    meta_path, progress_path = out / "meta.json", out / "progress.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint:
            return meta  # already complete: nothing to do
        raise GemmaforgeError(f"{out} already holds prepared data from other inputs or options: choose a new --out")
    state = None
    if progress_path.exists():
        state = json.loads(progress_path.read_text())
        if state.get("fingerprint") != fingerprint:
            raise GemmaforgeError(
                f"{out} holds an interrupted preparation of other inputs or options: choose a new --out or delete it"
            )
    writer = ShardWriter(out, tok.vocab_size, shard_tokens, state)
    writer.state["fingerprint"] = fingerprint
    skip = writer.state["docs_done"]

    bar = tqdm(desc="tokenizing", unit=" docs", initial=skip, disable=not progress, dynamic_ncols=True)
    pending: list[tuple[int, str]] = []

    def drain():
        ids_list = tok.encode_batch([text for _, text in pending], add_bos=True)
        for (index, _), ids in zip(pending, ids_list):
            writer.add("val" if is_val_doc(index, val_fraction) else "train", ids)
        bar.update(len(pending))
        bar.set_postfix(tokens=f"{writer.state['splits']['train']['tokens'] + writer.buffered_tokens:,}")
        pending.clear()

    n_docs = 0
    for index, text in enumerate(read_documents(files, field)):
        n_docs = index + 1
        if index < skip:
            continue  # done before an interruption: the shard holding it is already on disk
        if not text.strip():
            text = ""  # kept (as a lone <bos>) so document indices, hence the split, never shift
        pending.append((index, text))
        if len(pending) >= batch_docs:
            drain()
    if pending:
        drain()
    writer.flush()
    bar.close()

    splits = writer.state["splits"]
    real_docs = splits["train"]["tokens"] - splits["train"]["docs"]  # tokens beyond one <bos> per doc
    if n_docs == 0 or real_docs <= 0:
        raise GemmaforgeError(f"the corpus is empty: {len(files)} input file(s) gave no text; check the inputs and --field")
    if not splits["val"]["files"]:
        raise GemmaforgeError(
            f"the validation split is empty ({n_docs} documents, --val-fraction {val_fraction}): raise --val-fraction"
        )
    tok_file = out / "tokenizer.json"
    tok.save(tok_file)
    meta = {
        "format": FORMAT, "fingerprint": fingerprint, "tokenizer": str(tok.source), "tokenizer_sha256": digest,
        "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
        "dtype": writer.dtype.str, "inputs": [str(f) for f in files], "field": field,
        "val_fraction": val_fraction, "documents": n_docs, "splits": splits,
    }
    atomic.write_json(meta_path, meta)
    progress_path.unlink(missing_ok=True)
    return meta


def write_token_dataset(out: str | Path, docs: dict[str, Sequence[Sequence[int]]], *, vocab_size: int,
                        bos_id: int = 2, tokenizer_sha256: str = "test") -> dict:
    """Write already-tokenized documents (each starting with <bos>) as a prepared corpus; for tests."""
    out = Path(out)
    prepare_out_dir(out)
    writer = ShardWriter(out, vocab_size, shard_tokens=1 << 62)
    for split, split_docs in docs.items():
        for d in split_docs:
            writer.add(split, d)
    writer.flush()
    (out / "progress.json").unlink(missing_ok=True)
    meta = {"format": FORMAT, "fingerprint": "synthetic", "tokenizer": None, "tokenizer_sha256": tokenizer_sha256,
            "vocab_size": vocab_size, "bos_id": bos_id, "eos_id": 1, "pad_id": 0,
            "dtype": writer.dtype.str, "splits": writer.state["splits"]}
    atomic.write_json(out / "meta.json", meta)
    return meta


# ---- reading shards -------------------------------------------------------------------------------
def read_meta(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir) if data_dir else Path("")
    if not str(data_dir) or not data_dir.is_dir():
        raise GemmaforgeError(
            f"data directory {str(data_dir) or '(none)'!r} does not exist: run `gemmaforge prepare-data INPUTS --out DIR` "
            "and set data: DIR"
        )
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        hint = " (an interrupted prepare-data: rerun the same command to finish it)" if (data_dir / "progress.json").exists() else ""
        raise GemmaforgeError(f"{data_dir} has no meta.json{hint}: prepare it with `gemmaforge prepare-data`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise GemmaforgeError(f"{meta_path} is not a {FORMAT} corpus: prepare it again with `gemmaforge prepare-data`")
    return meta


class TokenStream:
    """One split as one long token array, memory-mapped shard by shard (nothing is read up front)."""

    def __init__(self, data_dir: str | Path, split: str, meta: dict | None = None):
        data_dir = Path(data_dir)
        self.meta = meta or read_meta(data_dir)
        dtype = np.dtype(self.meta["dtype"])
        files = self.meta["splits"][split]["files"]
        if not files:
            raise GemmaforgeError(f"{data_dir} has no {split!r} tokens: prepare it with a larger corpus")
        self.shards = []
        for name in files:
            path = data_dir / name
            if not path.is_file():
                raise GemmaforgeError(f"shard {path} is missing: prepare the data directory again")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated split, across shard boundaries."""
        parts, pos, end = [], start, start + length
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < end:
            lo = pos - self.starts[i]
            hi = min(end, self.starts[i + 1]) - self.starts[i]
            parts.append(self.shards[i][lo:hi])
            pos += hi - lo
            i += 1
        return np.concatenate(parts).astype(np.int64)


class PackedWindows(IndexedSource):
    """Fixed-length training windows over a TokenStream, in a seeded order that depends only on the
    sample index: batch ``i`` is the same whatever happened before, which makes resume exact."""

    def __init__(self, stream: TokenStream, seq_len: int, bos_id: int, seed: int = 0, shuffle: bool = True,
                 packing: str = "segments"):
        if packing not in PACKING:
            raise GemmaforgeError(f"packing {packing!r} is not known: use one of {', '.join(PACKING)}")
        self.stream, self.seq_len, self.bos_id = stream, seq_len, bos_id
        self.seed, self.shuffle, self.packing = seed, shuffle, packing
        self.num_windows = (len(stream) - 1) // seq_len
        if self.num_windows < 1:
            raise GemmaforgeError(
                f"the corpus has {len(stream)} tokens, fewer than one window of seq_len={seq_len} + 1: "
                "lower seq_len or add data"
            )
        self.window_index = EpochOrder(self.num_windows, seed, shuffle)

    @property
    def num_samples(self) -> int:
        return self.num_windows

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        x = self.stream.read(w * self.seq_len, self.seq_len + 1)
        tokens, labels = x[:-1].copy(), x[1:].copy()
        tokens[0] = self.bos_id
        labels[labels == self.bos_id] = IGNORE
        return tokens, labels

    def batch(self, samples: Sequence[int]) -> Batch:
        windows = [self.window_index(s) for s in samples]
        pairs = [self.window(w) for w in windows]
        tokens = torch.from_numpy(np.stack([p[0] for p in pairs]))
        batch = Batch(tokens=tokens, labels=torch.from_numpy(np.stack([p[1] for p in pairs])),
                      windows=torch.tensor(windows, dtype=torch.long))
        if self.packing == "segments":
            batch.segment_ids, batch.positions = document_segments(tokens, self.bos_id)
        return batch


def document_segments(tokens: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] tokens, each row starting with <bos> -> (segment ids, positions) [B, T]: segment k is the
    k-th document of the row, and positions count from 0 at each document's <bos>."""
    is_bos = tokens == bos_id
    segment_ids = is_bos.long().cumsum(1) - 1
    t = torch.arange(tokens.shape[1]).expand_as(tokens)
    starts = torch.where(is_bos, t, torch.zeros_like(t)).cummax(1).values
    return segment_ids, t - starts


def packed_windows(cfg, split: str, meta: dict | None = None, *, shuffle: bool | None = None) -> PackedWindows:
    """The windows of ``cfg.data``'s ``split`` as a run with config ``cfg`` reads them (training
    windows shuffled per epoch, validation windows in order)."""
    meta = meta or read_meta(cfg.data)
    shuffle = split == "train" if shuffle is None else shuffle
    return PackedWindows(TokenStream(cfg.data, split, meta), cfg.seq_len, meta["bos_id"], cfg.seed, shuffle=shuffle,
                         packing=cfg.packing)
