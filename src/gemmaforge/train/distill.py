"""Cached teacher logits for knowledge distillation (docs/reference.md §6).

A live teacher runs next to the student (objectives.LiveTeacher). When the same windows are seen
several times, or the teacher is expensive, its logits can be cached once instead, per training
window (objectives.CachedTeacher reads them back):

- ``topk``: the k largest logits per token. Training uses q = softmax(z_topk / tau): the teacher's
  distribution renormalised over its top k, which is the exact distribution when k = vocab.
- ``sample`` (Gemma 3): k tokens drawn from the teacher's distribution at temperature tau, with
  replacement; the distinct tokens keep their logits, everything else gets probability zero, and the
  target is renormalised over them. Padding entries (fewer than k distinct tokens) have logit -inf.

On disk: ``ids.npy`` int32 and ``logits.npy`` float32, both [windows, seq_len, k], written in place
with ``progress.json`` as the resume point, and ``meta.json`` last. The teacher sees each window as
training presents it (the same ``packing``: segment ids and per-document positions), so cached and
live targets agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import atomic
from ..errors import GemmaforgeError
from .config import TrainConfig
from .data import packed_windows, prepare_out_dir, read_meta
from .models import check_tokenizer, load_teacher, source_of

CACHE_FORMAT = "gemmaforge-teacher-cache-v1"


def sample_targets(z: torch.Tensor, k: int, tau: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 3 style: k draws from softmax(z / tau) per row -> (distinct ids, their logits) [n, k],
    padded with id 0 / logit -inf."""
    draws = torch.multinomial(torch.softmax(z.float() / tau, dim=-1), k, replacement=True, generator=generator)
    draws, _ = draws.sort(dim=1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = first.long().cumsum(1) - 1  # k draws -> index of their distinct value
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    used = torch.arange(k, device=z.device)[None, :] < first.sum(1, keepdim=True)
    logits = z.float().gather(1, ids).masked_fill(~used, float("-inf"))
    return ids.masked_fill(~used, 0), logits


def build_teacher_cache(cfg: TrainConfig, *, batch: int = 4, progress: bool = True) -> Path:
    """Run the teacher over every training window once and store its top-k / sampled logits."""
    from tqdm import tqdm

    out = Path(cfg.teacher_cache)
    meta = read_meta(cfg.data)
    windows = packed_windows(cfg, "train", meta, shuffle=False)
    n, k = windows.num_windows, cfg.cache_k
    prepare_out_dir(out)
    if not cfg.teacher:
        raise GemmaforgeError(f"{out} holds no teacher cache and no teacher is configured: set teacher: MODEL")
    check_tokenizer(source_of(cfg.teacher), meta, "teacher")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    teacher = load_teacher(cfg, device)
    if meta["vocab_size"] > teacher.config.vocab_size:
        raise GemmaforgeError("the data's vocabulary is larger than the teacher's: prepare the data with its tokenizer")
    k = min(k, teacher.config.vocab_size)
    identity = {"format": CACHE_FORMAT, "mode": cfg.cache_mode, "k": k, "seq_len": cfg.seq_len, "num_windows": n,
                "vocab_size": teacher.config.vocab_size, "data_fingerprint": meta["fingerprint"],
                "tokenizer_sha256": meta["tokenizer_sha256"], "packing": cfg.packing,
                "teacher": cfg.teacher, "teacher_quant": cfg.teacher_quant,
                "sample_temperature": cfg.temperature if cfg.cache_mode == "sample" else None, "seed": cfg.seed}
    progress_path = out / "progress.json"
    done = 0
    if progress_path.exists():
        state = json.loads(progress_path.read_text())
        if state["identity"] == identity:
            done = state["done"]
    mode = "r+" if done else "w+"
    ids_mm = np.lib.format.open_memmap(out / "ids.npy", mode=mode, dtype=np.int32, shape=(n, cfg.seq_len, k))
    z_mm = np.lib.format.open_memmap(out / "logits.npy", mode=mode, dtype=np.float32, shape=(n, cfg.seq_len, k))
    bar = tqdm(total=n, initial=done, desc="teacher logits", unit=" windows", disable=not progress)
    with torch.no_grad():
        for start in range(done, n, batch):
            stop = min(n, start + batch)
            b = windows.batch(range(start, stop)).to(device)
            h = teacher.hidden_states(b.tokens, b.positions, segment_ids=b.segment_ids)
            for j, w in enumerate(range(start, stop)):  # one window at a time: [T, vocab] fp32 at most
                z = teacher.logits(h[j]).float()
                if cfg.cache_mode == "topk":
                    vals, ids = z.topk(k, dim=-1)
                else:  # seeded by window, so an interrupted cache resumes to identical contents
                    g = torch.Generator(device=z.device).manual_seed(cfg.seed * 1_000_003 + w)
                    ids, vals = sample_targets(z, k, cfg.temperature, g)
                ids_mm[w] = ids.to(torch.int32).cpu().numpy()
                z_mm[w] = vals.cpu().numpy()
            ids_mm.flush()
            z_mm.flush()
            atomic.write_json(progress_path, {"identity": identity, "done": stop})
            bar.update(stop - start)
    bar.close()
    atomic.write_json(out / "meta.json", identity)
    progress_path.unlink(missing_ok=True)
    return out


class TeacherCache:
    """Cached teacher logits, looked up by training window index."""

    def __init__(self, path: str | Path, data_meta: dict, seq_len: int, num_windows: int, packing: str = "segments"):
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise GemmaforgeError(
                f"teacher cache {path} is missing or incomplete: run `gemmaforge distill CONFIG --cache-only` "
                "with teacher: set"
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != CACHE_FORMAT:
            raise GemmaforgeError(f"{path} is not a gemmaforge teacher cache: build it with distill --cache-only")
        if self.meta["data_fingerprint"] != data_meta["fingerprint"] or self.meta["num_windows"] != num_windows:
            raise GemmaforgeError(f"teacher cache {path} was built for other data: rebuild it for {data_meta.get('inputs', 'this data')}")
        if self.meta["seq_len"] != seq_len:
            raise GemmaforgeError(f"teacher cache {path} has seq_len {self.meta['seq_len']}, the run {seq_len}: "
                                  "use the same seq_len or rebuild the cache")
        built = self.meta.get("packing", "concat")  # caches from before segments saw whole windows
        if built != packing:
            raise GemmaforgeError(f"teacher cache {path} was built with packing: {built}, the run uses {packing}: "
                                  "use the same packing or rebuild the cache")
        self.vocab_size = self.meta["vocab_size"]
        self.ids = np.load(path / "ids.npy", mmap_mode="r")
        self.logits = np.load(path / "logits.npy", mmap_mode="r")

    def lookup(self, windows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        w = windows.numpy()
        ids = torch.from_numpy(np.ascontiguousarray(self.ids[w])).long()
        z = torch.from_numpy(np.ascontiguousarray(self.logits[w]))
        return ids.to(device), z.to(device)
