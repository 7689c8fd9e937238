"""JSONL data for post-training, read and tokenized at start-up with the Gemma chat template.

Three record shapes, one per line (blank lines are skipped; anything else that is wrong is an error
naming the file and line):

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}   sft, gkd
    {"prompt": "..." or [messages], ...any other fields}                            rl (fields go to the reward)
    {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}             reward

Conversations are rendered by ``chat.chat_pieces`` (the one copy of the template). Each piece is
tokenized on its own, so the tokens of a model reply are exactly what the model writes after the
generation prompt ``<start_of_turn>model\\n`` at inference time; a piece boundary always sits next to
a control token, which the tokenizer splits at anyway, so the ids are also those of the whole string.
A reply's targets are its text and the ``<end_of_turn>`` that ends it: the model must learn to stop.

The held-out split is ``val_data`` if set, else every ~1/``val_fraction``-th record of ``data``
(``data.is_val_doc``, as prepare-data splits documents). The run's ``meta`` (what ``setup.start``
checks the model against) describes the tokenizer; its digest is what ``models.check_tokenizer``
compares with a checkpoint's own tokenizer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..chat import END_OF_TURN, chat_pieces
from ..errors import GemmaforgeError
from .config import TrainConfig
from .data import is_val_doc, read_jsonl, tokenizer_digest
from .models import source_of
from .packing import Tokens

FORMAT = "gemmaforge-jsonl-v1"


@dataclass(frozen=True)
class Record:
    where: str  # "FILE line N", for error messages
    row: dict


@dataclass(frozen=True, eq=False)
class Prompt:
    ids: list[int]  # the rendered prompt, ending with the generation prompt <start_of_turn>model\n
    fields: dict  # the record's other fields (an RL reward function's reference answer, ...)
    completion: list[int] | None = None  # a reference reply (gkd: the dataset's completion)
    text: Any = None  # the record's prompt as written (a string, or its messages before the reply)


@dataclass(frozen=True, eq=False)
class Pair:
    chosen: Tokens  # prompt + chosen reply, the reply's tokens the targets
    rejected: Tokens


# ---- the tokenizer and the run's meta ---------------------------------------------------------------
def load_chat_tokenizer(cfg: TrainConfig):
    """``tokenizer`` if set, else the model's own; it must know Gemma's turn tokens."""
    from ..config import PRESETS
    from ..tokenizer import load_tokenizer

    source = cfg.tokenizer or source_of(cfg.model)
    if cfg.tokenizer is None and source in PRESETS:
        raise GemmaforgeError(f"model {cfg.model} is a preset with no tokenizer: set tokenizer: FILE "
                              "(a .gguf, tokenizer.model or tokenizer.json) to read the JSONL data with")
    tok = load_tokenizer(source)
    if tok.start_of_turn_id is None or tok.end_of_turn_id is None:
        raise GemmaforgeError(f"tokenizer {tok.source} has no <start_of_turn>/<end_of_turn> tokens: "
                              "chat data needs a Gemma tokenizer")
    return tok


def jsonl_meta(cfg: TrainConfig, tok) -> dict:
    """The run's data description (the counterpart of a prepared corpus's meta.json)."""
    files = [Path(cfg.data)] + ([Path(cfg.val_data)] if cfg.val_data else [])
    h = hashlib.sha256()
    for f in files:
        if not f.is_file():
            raise GemmaforgeError(f"data file {f} does not exist: set data: FILE.jsonl (docs/post_training.md)")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    digest = tokenizer_digest(tok)
    h.update(f"{digest} {cfg.val_fraction}".encode())
    return {"format": FORMAT, "fingerprint": h.hexdigest(), "tokenizer": str(tok.source), "tokenizer_sha256": digest,
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id if tok.pad_id is not None else tok.eos_id, "inputs": [str(f) for f in files]}


# ---- records ----------------------------------------------------------------------------------------
def records(cfg: TrainConfig, split: str) -> list[Record]:
    """The records of ``split`` ("train" or "val")."""
    if cfg.val_data:
        path = Path(cfg.data if split == "train" else cfg.val_data)
        found = [Record(f"{path} line {n}", row) for n, row in read_jsonl(path)]
    else:
        path = Path(cfg.data)
        found = [Record(f"{path} line {n}", row) for i, (n, row) in enumerate(read_jsonl(path))
                 if is_val_doc(i, cfg.val_fraction) == (split == "val")]
    if not found:
        hint = "add records" if cfg.val_data or split == "train" else "raise val_fraction or set val_data: FILE"
        raise GemmaforgeError(f"the {split} split of {path} has no records: {hint}")
    return found


def _field(rec: Record, name: str, kind=None) -> Any:
    if name not in rec.row:
        raise GemmaforgeError(f"{rec.where} has no field {name!r} (docs/post_training.md lists the record shapes)")
    value = rec.row[name]
    if kind is not None and not isinstance(value, kind):
        raise GemmaforgeError(f"{rec.where}: {name!r} must be a {getattr(kind, '__name__', 'string or list')}, "
                              f"got {type(value).__name__}")
    return value


def _pieces(rec: Record, messages) -> list[tuple[str, bool]]:
    try:
        return chat_pieces(messages)
    except GemmaforgeError as e:
        raise GemmaforgeError(f"{rec.where}: {e}") from None


def _encode_pieces(tok, pieces: list[tuple[str, bool]]) -> Tokens:
    """Tokenize runs of context and of reply pieces separately (see the module docstring)."""
    ids, targets = [], []
    run, flag = [], None
    for text, reply in pieces + [("", None)]:
        if reply is not flag and run:
            part = tok.encode("".join(run), add_bos=False)
            ids += part
            targets += [bool(flag)] * len(part)
            run = []
        run.append(text)
        flag = reply
    return Tokens(np.asarray(ids, dtype=np.int64), np.asarray(targets, dtype=bool))


def conversation(tok, rec: Record) -> Tokens:
    """A ``messages`` record -> its tokens, the model's replies the targets."""
    pieces = _pieces(rec, _field(rec, "messages", list))
    if not any(reply for _, reply in pieces):
        raise GemmaforgeError(f"{rec.where}: the conversation has no assistant turn, so nothing to learn: "
                              "add the model's reply or remove the line")
    return _encode_pieces(tok, pieces)


def _prompt_messages(rec: Record) -> list:
    if "messages" in rec.row:
        return list(_field(rec, "messages", list))
    prompt = _field(rec, "prompt", (str, list))
    if isinstance(prompt, str):
        if not prompt.strip():
            raise GemmaforgeError(f"{rec.where}: the prompt is empty")
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _rendered_prompt(tok, rec: Record, messages: list) -> list[int]:
    pieces = _pieces(rec, messages)
    pieces.append(("<start_of_turn>model\n", False))  # the generation prompt, as chat.format_chat adds it
    return _encode_pieces(tok, pieces).ids.tolist()


def _prompt_ids(tok, rec: Record, messages: list, chat: bool) -> list[int]:
    if chat:
        return _rendered_prompt(tok, rec, messages)
    if not isinstance(rec.row.get("prompt"), str):
        raise GemmaforgeError(f"{rec.where}: with chat_template: false a prompt is plain text ({{\"prompt\": \"...\"}}), "
                              "not messages")
    return tok.encode(rec.row["prompt"], add_bos=True)


def prompt(tok, rec: Record, chat: bool = True) -> Prompt:
    """A prompt to sample from, and its reference completion if the record has one: a ``completion``
    field, or the last turn of a ``messages`` record that ends with the assistant (the other turns are
    then the prompt). ``chat=False`` (a pre-trained model that never saw the template): the prompt is
    ``<bos>`` + its text and a completion its plain tokens."""
    messages = _prompt_messages(rec)
    completion = None
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") in ("assistant", "model"):
        reply = _pieces(rec, messages)[-2][0]  # (reply text + <end_of_turn>, True), then "\n"
        completion = tok.encode(reply, add_bos=False)
        messages = messages[:-1]
    elif "completion" in rec.row:
        completion = reply_tokens(tok, _field(rec, "completion", str), chat)
    if not messages:
        raise GemmaforgeError(f"{rec.where}: nothing before the reply: a prompt needs a user turn")
    fields = {k: v for k, v in rec.row.items() if k not in ("messages", "prompt", "completion")}
    text = rec.row["prompt"] if "prompt" in rec.row else messages
    return Prompt(_prompt_ids(tok, rec, messages, chat), fields, completion, text)


def reply_tokens(tok, text: str, chat: bool = True) -> list[int]:
    """A model reply as the model writes it: trimmed (the template's ``| trim``), then <end_of_turn>;
    without the template, the text's own tokens."""
    return tok.encode(text.strip() + END_OF_TURN, add_bos=False) if chat else tok.encode(text, add_bos=False)


def scored(tok, rec: Record, reply: str, chat: bool = True) -> Tokens:
    """The record's prompt followed by ``reply``, the reply's tokens the targets."""
    return Tokens.join(_prompt_ids(tok, rec, _prompt_messages(rec), chat), reply_tokens(tok, reply, chat))


def pair(tok, rec: Record, chat: bool = True) -> Pair:
    """A preference record -> prompt + chosen and prompt + rejected."""
    chosen, rejected = (_field(rec, k, str) for k in ("chosen", "rejected"))
    if not chosen.strip() or not rejected.strip():
        raise GemmaforgeError(f"{rec.where}: {'chosen' if not chosen.strip() else 'rejected'} is empty: "
                              "a preference pair needs two non-empty replies")
    if chosen.strip() == rejected.strip():
        raise GemmaforgeError(f"{rec.where}: chosen and rejected are identical, so they express no preference: "
                              "remove the line")
    return Pair(scored(tok, rec, chosen, chat), scored(tok, rec, rejected, chat))
