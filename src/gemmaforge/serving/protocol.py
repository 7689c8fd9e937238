"""OpenAI request bodies -> one checked ``Call``; bad input -> ``ApiError`` in OpenAI's error shape.

Fields, defaults and ranges follow OpenAI's API reference (completions and chat completions), with
vLLM's extensions where OpenAI has no field (``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``). docs/serving.md lists every field. Every check names the field (``param``) and says
what is valid, so a client sees ``{"error": {"message", "type", "param", "code"}}``, never a 500.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..chat import encode_chat
from ..errors import GemmaforgeError
from ..generation.sampling import MAX_LOGPROBS, SamplingParams

# Fields we know and do not implement: rejected, not silently ignored (a tool call that is never
# made would look like a model that ignores instructions).
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "suffix", "audio", "modalities", "prediction")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Call:
    """A checked request: token-id prompts and everything the runner and the response need."""

    chat: bool
    prompts: list[list[int]]
    params: SamplingParams  # max_new_tokens is set per prompt from max_tokens and the room left
    max_tokens: int | None  # None = as much as the context allows (chat's default)
    n: int
    stop: tuple[str, ...]
    logprobs: int | None  # top alternatives per token; None = no log-probs
    echo: bool
    stream: bool
    include_usage: bool
    ignore_eos: bool
    watermark: str | None = None  # the server's SynthID key set that marks the completions


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e}): send a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(404, f"the model {model!r} does not exist: this server serves {served!r} (GET /v1/models)",
                       "model", code="model_not_found")


def parse_call(body: dict, tokenizer, *, chat: bool, max_len: int, max_prompt_tokens: int, max_n: int,
               watermarks: tuple[str, ...] = (), watermark_default: str | None = None) -> Call:
    for key in UNSUPPORTED:
        if body.get(key) not in (None, [], {}):
            raise ApiError(400, f"{key!r} is not supported by this server", key, code="unsupported_parameter")
    if body.get("logit_bias"):
        raise ApiError(400, "'logit_bias' is not supported by this server", "logit_bias", code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(400, "only response_format {'type': 'text'} is supported", "response_format",
                       code="unsupported_parameter")

    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with stream: true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object like {'include_usage': true}", "stream_options")
    include_usage = bool(options and _bool(options, "include_usage", False, "stream_options.include_usage"))

    if chat:
        prompts = [chat_prompt(body, tokenizer)]
        echo = False
        logprobs = None
        if _bool(body, "logprobs", False):
            logprobs = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
        elif body.get("top_logprobs") is not None:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), None, minimum=1)
    else:
        prompts = _completion_prompts(body, tokenizer)
        echo = _bool(body, "echo", False)
        logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        max_tokens = _max_tokens(body, ("max_tokens",), COMPLETIONS_DEFAULT_MAX_TOKENS, minimum=0)
        if max_tokens == 0 and not echo:
            raise ApiError(400, "max_tokens=0 generates nothing: use it with echo (to score the prompt) "
                                "or ask for at least 1 token", "max_tokens")

    vocab = tokenizer.vocab_size
    for i, ids in enumerate(prompts):
        where = "messages" if chat else "prompt"
        if not ids:
            raise ApiError(400, f"prompt {i} is empty: give some text or token ids", where)
        if min(ids) < 0 or max(ids) >= vocab:
            raise ApiError(400, f"prompt {i} has token ids outside [0, {vocab})", where)
        limit = min(max_prompt_tokens, max_len - (0 if max_tokens == 0 else 1))
        if len(ids) > limit:
            raise ApiError(400, f"prompt {i} has {len(ids)} tokens, more than this server accepts ({limit}; "
                                f"--max-prompt-tokens {max_prompt_tokens}, context {max_len}): shorten it",
                           where, code="context_length_exceeded")
        if max_tokens and body.get("max_tokens", body.get("max_completion_tokens")) is not None \
                and len(ids) + max_tokens > max_len:
            raise ApiError(400, f"prompt {i} has {len(ids)} tokens and max_tokens is {max_tokens}, more than the "
                                f"context of {max_len}: lower max_tokens or shorten the prompt",
                           "max_tokens", code="context_length_exceeded")

    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop")

    n = _int(body, "n", 1, 1, max_n)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
            top_k=max(_int(body, "top_k", 0, -1, None), 0),  # vLLM: -1 (or 0) = off
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, None, open_low=True),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            seed=None if seed is None else seed % 2**63,
            logprobs=logprobs or 0,
            stop=tuple(stop),
        )
    except GemmaforgeError as e:  # a range _number did not cover: still the client's mistake
        raise ApiError(400, str(e)) from None
    ignore_eos = _bool(body, "ignore_eos", False)
    return Call(chat, prompts, params, max_tokens, n, tuple(stop), logprobs, echo, stream, include_usage,
                ignore_eos, _watermark(body, watermarks, watermark_default))


def _watermark(body: dict, names: tuple[str, ...], default: str | None) -> str | None:
    """The request's ``watermark`` (true, false or a key-set name) under the server's policy:
    ``default`` is the set that marks requests that do not say (None: opt-in). When the server marks
    every completion, a request may pick another of its key sets but not turn the mark off."""
    asked = body.get("watermark")
    if asked is None:
        return default
    if not names:
        raise ApiError(400, "this server holds no watermark keys: drop 'watermark' or start the server with "
                            "--watermark KEYFILE", "watermark")
    if asked is True:
        return default or names[0]
    if asked is False:
        if default is not None:
            raise ApiError(400, "this server watermarks every completion (--watermark-requests all): "
                                "'watermark': false is not allowed", "watermark")
        return None
    if isinstance(asked, str) and asked in names:
        return asked
    raise ApiError(400, f"'watermark' must be true, false or one of this server's key sets {list(names)}, "
                        f"got {asked!r}", "watermark")


# ---- prompts ------------------------------------------------------------------------------------
def chat_prompt(body: dict, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    try:
        return encode_chat(tokenizer, messages)
    except GemmaforgeError as e:
        raise ApiError(400, str(e), "messages") from None


def _completion_prompts(body: dict, tokenizer) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists (OpenAI's four)."""
    prompt = body.get("prompt")
    bad = ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                        "lists of token ids", "prompt")
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt, add_bos=True)]
    if not isinstance(prompt, list) or not prompt:
        raise bad
    if all(_is_int(t) for t in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p, add_bos=True) for p in prompt]
    if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        return [list(p) for p in prompt]
    raise bad


# ---- scalar fields ----------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bool(body: dict, key: str, default: bool, name: str | None = None) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name or key}' must be true or false, got {v!r}", name or key)
    return v


def _int(body: dict, key: str, default, low: int | None, high: int | None):
    v = body.get(key)
    if v is None:
        return default
    if not _is_int(v) or (low is not None and v < low) or (high is not None and v > high):
        valid = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ApiError(400, f"'{key}' must be {valid}, got {v!r}", key)
    return v


def _number(body: dict, key: str, default: float, low: float, high: float | None, open_low: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and (v > low if open_low else v >= low) and (high is None or v <= high))
    if not ok:
        lo = "(" if open_low else "["
        valid = f"a number in {lo}{low}, {high}]" if high is not None else f"a number > {low}"
        raise ApiError(400, f"'{key}' must be {valid}, got {v!r}", key)
    return float(v)


def _max_tokens(body: dict, keys: tuple[str, ...], default, minimum: int):
    for key in keys:
        if body.get(key) is not None:
            return _int(body, key, default, minimum, None)
    return default
