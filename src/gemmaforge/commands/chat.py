"""``gemmaforge chat``: an interactive conversation in Gemma's turn template, streamed as it is written.

    $ gemmaforge chat --temperature 0.7
    >>> Hi! Who are you?
    ...
    /reset   forget the conversation        /exit   quit (so does Ctrl-D)

The whole history is re-sent every turn (the template of docs/reference.md §4, via ``encode_chat``);
when it no longer fits the context, the oldest exchanges are dropped. Stdin need not be a terminal:
piped lines are read as user turns, which is how the tests drive it.
"""

from __future__ import annotations

import argparse
import sys

from .generate import (add_model_arguments, add_sampling_arguments, load_model_and_tokenizer, make_engine,
                       sampling_params)

HELP = "/reset forgets the conversation, /exit quits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="instructions merged into the first user turn")


def _read_line(interactive: bool) -> str | None:
    """The next user line, or None at end of input."""
    try:
        return input(">>> ") if interactive else (sys.stdin.readline() or None)
    except EOFError:
        return None


def fit_history(history: list[dict], count_tokens, budget: int) -> list[dict]:
    """Drop the oldest user/model exchanges until the conversation's tokens fit ``budget``."""
    while count_tokens(history) > budget and len(history) > 1:
        history = history[2:]
    return history


def run(args: argparse.Namespace) -> int:
    from ..chat import encode_chat
    from ..generation import stream

    params = sampling_params(args)
    model, tokenizer = load_model_and_tokenizer(args)
    engine = make_engine(model, args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    # Room for the reply: the prompt may use what max_new_tokens leaves of the context.
    context = model.config.max_position_embeddings
    budget = context - min(params.max_new_tokens, context // 2)
    if interactive:
        print(f"gemmaforge chat: {HELP}", file=sys.stderr)
    history: list[dict] = []
    while (line := _read_line(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(conversation reset)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}: {HELP}", file=sys.stderr)
            continue
        history = fit_history(history + [{"role": "user", "content": text}],
                              lambda h: len(encode_chat(tokenizer, system + h)), budget)
        if len(encode_chat(tokenizer, system + history)) > budget:
            print(f"gemmaforge: error: that message is too long for the model's context ({context} tokens):"
                  " shorten it", file=sys.stderr)
            history = history[:-1]
            continue
        pieces = []
        for piece in stream(engine, tokenizer, system + history, params=params):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})
    return 0
