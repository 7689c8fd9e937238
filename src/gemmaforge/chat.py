"""Gemma's chat format: turning a conversation into the prompt an instruction-tuned model expects.

A conversation is a list of ``{"role": ..., "content": ...}`` dicts, as in transformers and OpenAI's
API. Gemma renders it as (docs/reference.md §4)::

    <bos><start_of_turn>user
    {text}<end_of_turn>
    <start_of_turn>model
    {reply}<end_of_turn>
    <start_of_turn>model          <- the generation prompt: the model writes its reply after this

The rules follow the official Gemma 3 chat template (tokenizer_config.json of google/gemma-3-*-it),
and ``format_chat`` returns exactly what ``apply_chat_template`` renders with it:

- the assistant role is written ``model``;
- Gemma has no system role: a leading system message is prepended to the first user message,
  separated by a blank line (``system + "\\n\\n" + user``);
- turns must alternate user / assistant, starting with user;
- each message's text is stripped of surrounding whitespace (the template's ``| trim``); the system
  text is not.

The string starts with ``<bos>``, so it must be tokenized *without* adding another one: use
:func:`encode_chat`, which does that. Like transformers, it matches special-token strings anywhere in
the text, so a user message containing ``<end_of_turn>`` does end the turn there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .errors import GemmaforgeError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

# What each accepted role is written as inside <start_of_turn>. "model" is accepted as a synonym of
# "assistant" so that a conversation read back from a Gemma transcript can be re-rendered.
_TURN_NAMES = {"user": "user", "assistant": "model", "model": "model"}


def format_chat(messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
    """The Gemma prompt for ``messages``, starting with ``<bos>``; ending with ``<start_of_turn>model\\n``
    when ``add_generation_prompt`` (so that the model answers next)."""
    text = "".join(piece for piece, _ in chat_pieces(messages))
    return text + f"{START_OF_TURN}model\n" if add_generation_prompt else text


def chat_pieces(messages: Sequence[Mapping]) -> list[tuple[str, bool]]:
    """``format_chat(messages, add_generation_prompt=False)`` cut into (text, is_reply) pieces: a reply
    piece is what the model writes in one of its turns, its text and the ``<end_of_turn>`` that ends
    it; everything else (``<bos>``, user turns, each ``<start_of_turn>model\n``) is context. Training
    on chats (train/chats.py) puts its loss on the reply pieces only."""
    pieces = [(BOS, False)]
    for role, text in _turns(messages):
        if role == "model":
            pieces += [(f"{START_OF_TURN}model\n", False), (f"{text}{END_OF_TURN}", True), ("\n", False)]
        else:
            pieces.append((f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n", False))
    return pieces


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of :func:`format_chat`, with exactly one ``<bos>`` (the one the string carries).

    Gemma degrades badly with a doubled or missing ``<bos>`` (docs/reference.md §4), which is the
    usual mistake when a formatted prompt goes through ``encode`` with its default ``add_bos=True``.
    """
    return tokenizer.encode(format_chat(messages, add_generation_prompt), add_bos=False)


def _turns(messages: Sequence[Mapping]) -> list[tuple[str, str]]:
    """``[(turn name, text), ...]`` after merging the system message and checking the role order."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise GemmaforgeError("a chat must be a list of {'role': ..., 'content': ...} messages")
    if not messages:
        raise GemmaforgeError("the chat has no messages: give at least one {'role': 'user', 'content': ...}")

    system_prefix = ""
    rest = list(enumerate(messages))
    if _role(messages[0], 0) == "system":
        # Not trimmed, exactly as the official template does it.
        system_prefix = _text(messages[0], 0, trim=False) + "\n\n"
        rest = rest[1:]
        if not rest:
            raise GemmaforgeError("the chat has only a system message: add a user message after it")

    turns = []
    for position, (index, message) in enumerate(rest):
        role = _role(message, index)
        expected = "user" if position % 2 == 0 else "assistant"
        if role == "system":
            raise GemmaforgeError(
                f"message {index} is a system message, but only the first message may be one "
                "(Gemma has no system turn; it is merged into the first user message)"
            )
        if _TURN_NAMES[role] != _TURN_NAMES[expected]:
            raise GemmaforgeError(
                f"message {index} has role {role!r} where Gemma needs {expected!r}: turns must alternate "
                "user/assistant starting with user (merge consecutive messages of one role)"
            )
        text = _text(message, index, trim=True)
        if position == 0:
            text = system_prefix + text
        turns.append((_TURN_NAMES[role], text))
    return turns


def _role(message: Mapping, index: int) -> str:
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise GemmaforgeError(f"message {index} must be a dict with 'role' and 'content', got {message!r:.80}")
    role = message["role"]
    if role not in _TURN_NAMES and role != "system":
        raise GemmaforgeError(f"message {index} has role {role!r}: use 'system', 'user' or 'assistant'")
    return role


def _text(message: Mapping, index: int, trim: bool) -> str:
    """A message's text. ``content`` is a string, or a list of ``{"type": "text", "text": ...}`` parts
    (the multimodal spelling; Gemma 3's template trims and joins the text parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content.strip() if trim else content
    if isinstance(content, Sequence) and all(isinstance(p, Mapping) for p in content):
        if any(p.get("type") != "text" for p in content):
            kinds = sorted({str(p.get("type")) for p in content} - {"text"})
            raise GemmaforgeError(f"message {index} has {', '.join(kinds)} content: gemmaforge models are text-only")
        texts = [str(p.get("text", "")) for p in content]
        if not trim:
            # The official template keeps only the first part of a list-valued system message.
            return texts[0] if texts else ""
        return "".join(t.strip() for t in texts)
    raise GemmaforgeError(f"message {index} content must be a string, got {type(content).__name__}")
