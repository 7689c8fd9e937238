"""Evaluation data from local files, or from the user's Hugging Face datasets cache; never the network.

    source = DataSource("eval_data")            # DIR/TASK/SPLIT.parquet or DIR/TASK/SPLIT.jsonl
    source = DataSource(None)                   # the HF datasets cache (offline), if `datasets` is installed
    rows = source.rows(spec, "test")            # list of dicts in the original dataset's columns

Rows are the original Hugging Face dataset's columns (``spec.columns`` are checked), one dict per row
as ``datasets`` yields them: a parquet file exported from the dataset (``ds.to_parquet``) gives the
very same dicts, so documents compare equal to lm-eval's (which matters for its few-shot rule that
drops the evaluated document from its own draw). A JSONL file is one JSON object per line.
MMLU keeps every subject in one ``DIR/mmlu/test`` and ``DIR/mmlu/dev`` file (the "all" layout) and
each subject task picks its rows (``spec.row_filter``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import GemmaforgeError
from ..train.data import read_jsonl
from .tasks.spec import TaskSpec

FORMATS = (".parquet", ".jsonl")


class DataSource:
    def __init__(self, root: str | Path | None = None):
        self.root = None if root is None else Path(root)
        if self.root is not None and not self.root.is_dir():
            raise GemmaforgeError(f"--data {self.root} is not a directory: it should hold TASK/SPLIT.parquet "
                                  "or TASK/SPLIT.jsonl files (docs/evaluation.md)")
        self._files: dict[Path, list[dict]] = {}
        self._hf: dict[tuple, list[dict]] = {}

    def describe(self, spec: TaskSpec, split: str) -> str:
        where = f"{self.root}/{spec.folder}" if self.root is not None else f"DIR/{spec.folder}"
        name = f" ({spec.dataset_name})" if spec.dataset_name and spec.data_name is None else ""
        return (f"{where}/{split}.parquet or {where}/{split}.jsonl with the columns of the Hugging Face "
                f"dataset {spec.dataset_path}{name}: {', '.join(spec.columns)}")

    def rows(self, spec: TaskSpec, split: str) -> list[dict]:
        """The split's rows (``spec.row_filter`` applied), before ``process_docs``."""
        if self.root is None:
            rows = self._from_hf_cache(spec, split)
        else:
            rows = self._from_files(spec, split)
        if spec.row_filter is not None:
            rows = [r for r in rows if spec.row_filter(r)]
        return rows

    # ---- local files ---------------------------------------------------------------------------------------
    def _from_files(self, spec: TaskSpec, split: str) -> list[dict]:
        folder = self.root / spec.folder
        path = next((folder / f"{split}{ext}" for ext in FORMATS if (folder / f"{split}{ext}").is_file()), None)
        if path is None:
            raise GemmaforgeError(f"no {split} data for {spec.folder if spec.data_name else spec.name}: "
                                  f"expected {self.describe(spec, split)}")
        if path not in self._files:
            rows = _read_parquet(path) if path.suffix == ".parquet" else _read_jsonl(path)
            self._files[path] = rows
        rows = self._files[path]
        _check_columns(rows, spec, path)
        return rows

    # ---- the Hugging Face datasets cache ------------------------------------------------------------------
    def _from_hf_cache(self, spec: TaskSpec, split: str) -> list[dict]:
        key = (spec.dataset_path, spec.dataset_name, split)
        if key not in self._hf:
            self._hf[key] = _load_cached_dataset(spec, split, self.describe(spec, split))
        rows = self._hf[key]
        _check_columns(rows, spec, f"the cached dataset {spec.dataset_path}")
        return rows


def _read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line (train.data.read_jsonl: a bad line is an error naming it)."""
    return [row for _, row in read_jsonl(path)]


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GemmaforgeError(f"reading {path} needs pyarrow (pip install pyarrow), or give the split as "
                              f"{path.with_suffix('.jsonl').name}") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's own error types for a corrupt or non-parquet file
        raise GemmaforgeError(f"{path} is not a readable parquet file ({e})") from None


def _check_columns(rows: list[dict], spec: TaskSpec, where) -> None:
    for n, row in enumerate(rows, 1):
        missing = [c for c in spec.columns if c not in row]
        if missing:
            raise GemmaforgeError(
                f"{where} row {n} lacks column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}: "
                f"{spec.name} needs {', '.join(spec.columns)} (as in {spec.dataset_path})")


def _load_cached_dataset(spec: TaskSpec, split: str, expected: str) -> list[dict]:
    hint = f"pass --data DIR with {expected}"
    try:
        import datasets
    except ImportError:
        raise GemmaforgeError(f"no data for {spec.name}: {hint} (or install `datasets` and cache "
                              f"{spec.dataset_path} beforehand)") from None
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE, os.environ.get("HF_DATASETS_OFFLINE")
    datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True  # never the network
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        ds = datasets.load_dataset(spec.dataset_path, spec.dataset_name, split=split)
    except Exception as e:  # not cached, or cached without this split: datasets raises many types
        raise GemmaforgeError(f"{spec.dataset_path} ({spec.dataset_name}) split {split!r} is not in the HF "
                              f"datasets cache ({type(e).__name__}): {hint}") from None
    finally:
        datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = saved[2]
    return [dict(r) for r in ds]
