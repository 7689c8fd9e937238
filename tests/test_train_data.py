"""prepare-data (tokenize -> shards) and the packing loader."""

import json
from pathlib import Path

import numpy as np
import pytest

from gemmaforge import GemmaforgeError
from gemmaforge.train import data as D

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma uses a SentencePiece vocabulary with byte fallback: 你好, café, 🦊.",
    "def f(x):\n    return x * 2\n",
    "",  # an empty document keeps its slot (a lone <bos>), so later indices do not shift
    "Second paragraph.\n\nThird paragraph with  double  spaces.",
    "Numbers 12345 and symbols <>&.",
    "A line in JSON with \"quotes\" and a tab\t.",
    "Last document.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from gemmaforge.tokenizer import load_tokenizer

    return load_tokenizer(None)


def _corpus(tmp_path: Path) -> list[Path]:
    """The same 8 documents as 2 text files, a JSONL file and a parquet file, in that order."""
    (tmp_path / "in").mkdir()
    a, b = tmp_path / "in" / "a.txt", tmp_path / "in" / "b.md"
    a.write_text(DOCS[0])
    b.write_text(DOCS[1])
    jl = tmp_path / "in" / "c.jsonl"
    jl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS[2:5])))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS[5:]}), tmp_path / "in" / "d.parquet")
    return [a, b, jl, tmp_path / "in" / "d.parquet"]


def _split_tokens(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.fromfile(out / f, dtype=meta["dtype"]) for f in meta["splits"][split]["files"]])


def test_prepare_tokenizes_every_format_with_bos_per_document(tmp_path, tokenizer):
    files = _corpus(tmp_path)
    out = tmp_path / "data"
    # text files need a different field name than JSONL/parquet; a text file ignores --field
    meta = D.prepare_data(files, out, tokenizer, field="body", val_fraction=0.25, shard_tokens=20, progress=False)
    want = {"train": [], "val": []}
    for i, doc in enumerate(DOCS):
        want["val" if D.is_val_doc(i, 0.25) else "train"].extend(tokenizer.encode(doc))
    for split in ("train", "val"):
        np.testing.assert_array_equal(_split_tokens(out, split), want[split])
    assert meta["splits"]["val"]["docs"] == 2 and meta["splits"]["train"]["docs"] == 6
    assert len(meta["splits"]["train"]["files"]) > 1  # shard_tokens=20 forces several shards
    assert meta["vocab_size"] == tokenizer.vocab_size and meta["bos_id"] == tokenizer.bos_id
    assert not (out / "progress.json").exists()
    # the saved tokenizer gives the same ids as the source (students ship it with their weights)
    from gemmaforge.tokenizer import load_tokenizer

    assert load_tokenizer(out / "tokenizer.json").encode(DOCS[1]) == tokenizer.encode(DOCS[1])
    # directory inputs expand to the same files in sorted order
    again = D.prepare_data([tmp_path / "in"], tmp_path / "data2", tokenizer, field="body", val_fraction=0.25,
                           shard_tokens=20, progress=False)
    assert again["splits"]["train"]["tokens"] == meta["splits"]["train"]["tokens"]


def test_interrupted_prepare_resumes_to_identical_files(tmp_path, tokenizer, monkeypatch):
    files = _corpus(tmp_path)
    kw = dict(field="body", val_fraction=0.25, shard_tokens=15, batch_docs=2, progress=False)
    D.prepare_data(files, tmp_path / "full", tokenizer, **kw)

    real_flush, calls = D.ShardWriter.flush, []

    def crashing_flush(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # "killed" after two shards were written
        real_flush(self)

    monkeypatch.setattr(D.ShardWriter, "flush", crashing_flush)
    with pytest.raises(KeyboardInterrupt):
        D.prepare_data(files, tmp_path / "part", tokenizer, **kw)
    monkeypatch.setattr(D.ShardWriter, "flush", real_flush)
    state = json.loads((tmp_path / "part" / "progress.json").read_text())
    assert state["chunks"] == 2 and not (tmp_path / "part" / "meta.json").exists()
    with pytest.raises(GemmaforgeError, match="interrupted prepare-data"):
        D.read_meta(tmp_path / "part")

    D.prepare_data(files, tmp_path / "part", tokenizer, **kw)
    full = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert full == sorted(p.name for p in (tmp_path / "part").iterdir())
    for name in full:
        if name != "meta.json":
            assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "part" / name).read_bytes(), name
    meta = lambda d: {k: v for k, v in json.loads((tmp_path / d / "meta.json").read_text()).items()}
    assert meta("full")["splits"] == meta("part")["splits"]


def test_prepare_bad_input(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(GemmaforgeError, match="corpus is empty"):
        D.prepare_data([empty], tmp_path / "o1", tokenizer, progress=False)
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n")
    with pytest.raises(GemmaforgeError, match="corpus is empty"):
        D.prepare_data([blank], tmp_path / "o2", tokenizer, progress=False)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"content": "hi"}\n')
    with pytest.raises(GemmaforgeError, match="no field 'text'.*--field"):
        D.prepare_data([wrong], tmp_path / "o3", tokenizer, progress=False)
    with pytest.raises(GemmaforgeError, match="does not exist"):
        D.prepare_data([tmp_path / "nope.txt"], tmp_path / "o4", tokenizer, progress=False)
    one = tmp_path / "one.txt"
    one.write_text("only one document")
    with pytest.raises(GemmaforgeError, match="validation split is empty.*--val-fraction"):
        D.prepare_data([one], tmp_path / "o5", tokenizer, progress=False)
    with pytest.raises(GemmaforgeError, match="does not exist: run `gemmaforge prepare-data"):
        D.read_meta(tmp_path / "missing")


def _synthetic(tmp_path, n_train=5, n_val=2, seed=0):
    rng = np.random.default_rng(seed)
    docs = {s: [[2] + list(rng.integers(3, 500, rng.integers(5, 40))) for _ in range(n)]
            for s, n in (("train", n_train), ("val", n_val))}
    out = tmp_path / "syn"
    D.write_token_dataset(out, docs, vocab_size=512)
    return out, docs


def test_packed_windows_cover_the_stream_once_per_epoch(tmp_path):
    out, docs = _synthetic(tmp_path, n_train=9)
    stream = D.TokenStream(out, "train")
    flat = np.concatenate(docs["train"])
    assert len(stream) == len(flat)
    np.testing.assert_array_equal(stream.read(3, 50), flat[3:53])
    seq = 16
    pw = D.PackedWindows(stream, seq, bos_id=2, seed=5)
    n = pw.num_windows
    assert n == (len(flat) - 1) // seq
    epoch0 = [pw.window_index(i) for i in range(n)]
    assert sorted(epoch0) == list(range(n)) and epoch0 != list(range(n))
    epoch1 = [pw.window_index(n + i) for i in range(n)]
    assert sorted(epoch1) == list(range(n)) and epoch1 != epoch0
    # order depends only on the sample index: a fresh loader (a resumed run) agrees
    assert [D.PackedWindows(stream, seq, 2, seed=5).window_index(n + 3)] == [epoch1[3]]
    b = pw.batch(range(n))
    assert (b.tokens[:, 0] == 2).all()  # every context starts with <bos>
    labelled = []
    for row, w in enumerate(b.windows.tolist()):
        x = flat[w * seq: w * seq + seq + 1]
        np.testing.assert_array_equal(b.tokens[row, 1:].numpy(), x[1:-1])
        want = np.where(x[1:] == 2, -100, x[1:])
        np.testing.assert_array_equal(b.labels[row].numpy(), want)
        labelled.extend(range(w * seq + 1, w * seq + seq + 1))
    assert sorted(labelled) == list(range(1, n * seq + 1))  # each stream token is a label exactly once


def test_too_short_corpus_is_a_clear_error(tmp_path):
    out, _ = _synthetic(tmp_path, n_train=1)
    with pytest.raises(GemmaforgeError, match="fewer than one window"):
        D.PackedWindows(D.TokenStream(out, "train"), 10_000, bos_id=2)
