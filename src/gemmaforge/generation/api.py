"""Text in, text out: ``gemmaforge.generation`` and ``gemmaforge.stream``.

    model, tok = gemmaforge.load(None), gemmaforge.load_tokenizer(None)
    gemmaforge.generate(model, tok, ["The capital of France is"], max_new_tokens=8)
    for piece in gemmaforge.stream(model, tok, "Tell me a joke", chat=True, temperature=0.7):
        print(piece, end="", flush=True)

This layer owns everything textual: encoding (plain, or wrapped in the chat template), the stop ids
of the tokenizer (``<eos>``, and ``<end_of_turn>`` for instruction-tuned models; docs/reference.md
section 4), and stop *strings*. The token-level work is ``Engine``'s.

Streaming text has two hazards, both handled by ``TextStream``: a character spelled by several
byte tokens must not be cut in half (the tokenizer's streaming decoder holds incomplete UTF-8), and
a stop string may arrive split over several tokens, so text that could still grow into a stop
string is held back until it either completes one (then it is dropped) or cannot any more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

from ..chat import encode_chat
from ..errors import GemmaforgeError, unknown_name
from ..model import Gemma
from ..tokenizer import Tokenizer
from .engine import FINISHED, Engine
from .sampling import SamplingParams

Messages = Sequence[Mapping]  # [{"role": "user", "content": "..."}, ...]


class TextStream:
    """One row's token ids -> the text to show, with stop ids and stop strings applied."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), stop_ids: frozenset[int] = frozenset()):
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self._stop, self._stop_ids = tuple(stop), stop_ids
        self._held = ""
        self.done = False

    def feed(self, token: int) -> str:
        if self.done:
            return ""
        if token in self._stop_ids:
            return self.finish()
        return self._release(self._held + self._decoder.feed(token), final=False)

    def finish(self) -> str:
        """End of generation: release what was held back, unless it completes a stop string."""
        if self.done:
            return ""
        text = self._release(self._held + self._decoder.flush(), final=True)
        self.done = True
        return text

    def _release(self, text: str, final: bool) -> str:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.done, self._held = True, ""
            return text[: min(hits)]
        # Only the longest tail that is the start of a stop string can still become one: an earlier
        # occurrence would need a longer such tail.
        keep = 0 if final else self._longest_stop_prefix(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def _longest_stop_prefix(self, text: str) -> int:
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


# ---- prompts ------------------------------------------------------------------------------------
def _is_messages(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0 and all(isinstance(m, Mapping) for m in x)


def _as_prompt_list(prompts) -> list:
    """One prompt (text or a conversation) or a list of them -> a list of them."""
    if isinstance(prompts, str) or _is_messages(prompts):
        return [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise GemmaforgeError("no prompts given: pass a string, a list of strings, or a list of chat messages")
    return list(prompts)


def encode_prompt(tokenizer: Tokenizer, prompt: str | Messages, chat: bool = False) -> list[int]:
    """A string (wrapped as one user turn when ``chat``) or a list of messages -> token ids with one <bos>."""
    if _is_messages(prompt):
        return encode_chat(tokenizer, prompt)
    if not isinstance(prompt, str):
        raise GemmaforgeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if not prompt:
        raise GemmaforgeError("the prompt is empty: give some text to continue")
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt, add_bos=True)


def sampling_params(params: SamplingParams | None = None, **sampling) -> SamplingParams:
    """``SamplingParams`` from keyword arguments, with a hint for a misspelled name."""
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    for key in sampling:
        if key not in names:
            raise unknown_name("sampling option", key, names)
    if params is None:
        return SamplingParams(**sampling)
    return dataclasses.replace(params, **sampling) if sampling else params


def _engine(model: Gemma | Engine) -> Engine:
    return model if isinstance(model, Engine) else Engine.for_model(model)


def _watermark_setup(watermark):
    """``Engine.steps``' setup that watermarks the call's scheduler (None: no watermark)."""
    if watermark is None:
        return None
    from ..watermark import attach_watermark, as_watermark

    wm = as_watermark(watermark)
    return lambda sched: attach_watermark(sched, wm)


# ---- the public functions ---------------------------------------------------------------------
def generate(model: Gemma | Engine, tokenizer: Tokenizer, prompts, *, chat: bool = False,
             params: SamplingParams | None = None, watermark=None, **sampling) -> list[str]:
    """Complete each prompt (all in one batch); returns one string per prompt, without the prompt,
    the stop token or the stop string. Sampling options are ``SamplingParams`` fields;
    ``watermark``: a ``gemmaforge.watermark.SynthIDTextWatermark`` (or its ``WatermarkConfig``)."""
    params = sampling_params(params, **sampling)
    setup = _watermark_setup(watermark)
    engine = _engine(model)
    ids = [encode_prompt(tokenizer, p, chat) for p in _as_prompt_list(prompts)]
    streams = [TextStream(tokenizer, params.stop, tokenizer.stop_ids) for _ in ids]
    texts = [[] for _ in ids]
    if not params.stop and setup is None:
        # Without stop strings the text is only needed at the end: one host sync for the batch.
        for stream_, text, row in zip(streams, texts, engine.generate(ids, params, tokenizer.stop_ids)):
            text.extend(stream_.feed(t) for t in row)
    else:
        for step in engine.steps(ids, params, tokenizer.stop_ids, setup=setup):
            for stream_, text, t in zip(streams, texts, step.tolist()):
                if t != FINISHED:
                    text.append(stream_.feed(t))
            if all(s.done for s in streams):
                break  # every row hit a stop string: closing the iterator ends the engine's loop
    for stream_, text in zip(streams, texts):
        text.append(stream_.finish())
    return ["".join(t) for t in texts]


def stream(model: Gemma | Engine, tokenizer: Tokenizer, prompt: str | Messages, *, chat: bool = False,
           params: SamplingParams | None = None, watermark=None, **sampling) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece, as soon as each piece is certain.

    Bad arguments raise here, at the call, not at the first ``next()``.
    """
    params = sampling_params(params, **sampling)
    ids = encode_prompt(tokenizer, prompt, chat)
    setup = _watermark_setup(watermark)
    steps = _engine(model).steps([ids], params, tokenizer.stop_ids, setup=setup)  # checks the prompt's length now
    return _stream(steps, TextStream(tokenizer, params.stop, tokenizer.stop_ids))


def _stream(steps: Iterator, text: TextStream) -> Iterator[str]:
    for step in steps:
        t = int(step[0])
        if t == FINISHED:
            break
        if piece := text.feed(t):
            yield piece
        if text.done:
            return
    if piece := text.finish():
        yield piece
