"""Tiny data for the post-training tests: a Gemma-shaped tokenizer of 300 ids (the tiny presets have
512) and JSONL files of chats, prompts and preference pairs."""

import json
import string
from pathlib import Path

from gemmaforge.tokenizer import BYTE, CONTROL, NORMAL, SPACE, _build_sentencepiece_bpe, load_tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CHARS = [SPACE, *string.ascii_lowercase, *string.digits, "user", "model", "\n"]


def tiny_tokenizer(directory, extra=()) -> Path:
    """tokenizer.json with Gemma's control tokens (bos 2, eos 1, pad 0), byte fallback and a few pieces
    (``extra`` pieces make a different vocabulary)."""
    pieces = SPECIALS + [f"<0x{i:02X}>" for i in range(256)] + CHARS + list(extra)
    types = [CONTROL] * len(SPECIALS) + [BYTE] * 256 + [NORMAL] * (len(CHARS) + len(extra))
    backend = _build_sentencepiece_bpe(pieces, types, byte_fallback=True)
    path = Path(directory) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(backend.to_str())
    assert load_tokenizer(path).vocab_size <= 512
    return path


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(user, reply, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": messages}


def counting_chats(n, seed=0):
    """'count from a' -> 'a b c d ...': learnable fast, so the loss must fall."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, length = rng.randrange(20), rng.randrange(3, 7)
        letters = " ".join(string.ascii_lowercase[(start + i) % 26] for i in range(length))
        rows.append(chat(f"count from {string.ascii_lowercase[start]}", letters))
    return rows


def low_ids(prompts, completions, completion_ids, **fields):
    """A verifiable reward for the RL tests: the fraction of completion tokens with an id below 256
    (half of a tiny preset's vocabulary, so random samples already vary)."""
    return [sum(t < 256 for t in ids) / max(len(ids), 1) for ids in completion_ids]
