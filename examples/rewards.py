"""Verifiable rewards for ``gemmaforge rl`` (``reward: examples/rewards.py:arithmetic``).

A reward function is called as TRL's are: ``fn(prompts, completions, completion_ids=..., **fields)``
with one list entry per completion, each other field of the JSONL records as a list of the same
length, and returns one number per completion.
"""

import re


def arithmetic(prompts, completions, answer, **fields):
    """1 if the first integer of the completion is the record's ``answer``, else 0."""
    out = []
    for text, want in zip(completions, answer):
        m = re.search(r"-?\d+", text)
        out.append(1.0 if m and int(m.group()) == int(want) else 0.0)
    return out
