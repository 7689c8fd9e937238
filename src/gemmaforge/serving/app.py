"""The HTTP layer: OpenAI-compatible routes over one ``Runner`` (FastAPI + uvicorn).

    POST /v1/completions        POST /v1/chat/completions     GET /v1/models
    POST /tokenize              POST /detokenize
    GET  /health                GET  /metrics (Prometheus text)

A route checks the body (protocol.py), turns each prompt into a ``Job`` for the runner, and shapes
the runner's outputs into OpenAI's response or its server-sent-event stream. Every error is a 4xx
(or 503 when full) in OpenAI's error shape; a client that disconnects has its rows freed at once.
API keys (``Authorization: Bearer KEY``) guard every route but /health and /metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import GemmaforgeError
from ..generation.scheduler import Request
from .protocol import ApiError, Call, chat_prompt, check_model, parse_body, parse_call
from .runner import Job, QueueFull, Runner

OPEN_ROUTES = ("/health", "/metrics")


def create_app(runner: Runner, tokenizer, *, model_name: str, api_keys: tuple[str, ...] = (),
               max_prompt_tokens: int | None = None, warmup: bool = True,
               watermark_default: str | None = None) -> FastAPI:
    """``watermark_default``: the key set (of ``runner.watermarks``) that marks requests which do
    not ask; None = only requests with ``"watermark": true`` or a set's name are marked."""
    max_prompt_tokens = max_prompt_tokens or runner.max_len
    started = int(time.time())
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        if warmup:  # compile the decode step now, not in the first client's TTFT: two requests,
            # so that one live row and several (a dynamic batch size; scheduler._decode) are both compiled
            bos = tokenizer.bos_id or 0
            await _collect([_job(runner, tokenizer, [bos] * 2, 3, tag) for tag in range(min(2, runner.num_rows))],
                           runner, None)
        state["ready"] = True
        yield
        runner.stop()

    app = FastAPI(title="gemmaforge", lifespan=lifespan, docs_url=None, redoc_url=None)

    # ---- errors: OpenAI's shape everywhere ------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.middleware("http")
    async def _auth(request: HttpRequest, call_next):
        if api_keys and request.url.path not in OPEN_ROUTES:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(given.encode(), k.encode()) for k in api_keys):
                what = "no API key given" if not given else "the API key is not valid"
                e = ApiError(401, f"{what}: send 'Authorization: Bearer <key>'", type="authentication_error",
                             code="invalid_api_key")
                return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    # ---- plain routes ----------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if runner.failure is not None:
            return JSONResponse({"status": "error", "error": repr(runner.failure)}, status_code=500)
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", **runner.load()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(runner.metrics.render(runner.load()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "gemmaforge", "max_model_len": runner.max_len}]}

    @app.post("/tokenize")
    async def tokenize(request: HttpRequest):
        body = parse_body(await request.body())
        check_model(body, model_name)
        if "messages" in body:
            ids = chat_prompt(body, tokenizer)
        elif isinstance(body.get("prompt"), str):
            ids = tokenizer.encode(body["prompt"], add_bos=body.get("add_special_tokens", True) is not False)
        else:
            raise ApiError(400, "give 'prompt' (a string) or 'messages'", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": runner.max_len}

    @app.post("/detokenize")
    async def detokenize(request: HttpRequest):
        body = parse_body(await request.body())
        check_model(body, model_name)
        ids = body.get("tokens")
        if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids) \
                or any(not 0 <= t < tokenizer.vocab_size for t in ids):
            raise ApiError(400, f"'tokens' must be a list of token ids in [0, {tokenizer.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(ids)}

    # ---- generation ----------------------------------------------------------------------------------
    async def generation(request: HttpRequest, chat: bool):
        if not state["ready"]:
            raise ApiError(503, "the model is still loading: retry in a few seconds", type="server_error",
                           headers={"Retry-After": "5"})
        body = parse_body(await request.body())
        check_model(body, model_name)
        call = parse_call(body, tokenizer, chat=chat, max_len=runner.max_len, max_prompt_tokens=max_prompt_tokens,
                          max_n=runner.num_rows, watermarks=tuple(runner.watermarks),
                          watermark_default=watermark_default)
        texts = _prompt_texts(body, call, tokenizer)
        queue: asyncio.Queue = asyncio.Queue()
        jobs = []
        try:
            for i, ids in enumerate(call.prompts):
                budget = runner.max_len - len(ids) if call.max_tokens is None else call.max_tokens
                jobs.append(runner.submit(_job(runner, tokenizer, ids, budget, i, call), queue))
        except QueueFull as e:
            for job in jobs:
                runner.abort(job)
            runner.metrics.rejected += 1
            raise ApiError(503, str(e), type="server_error", code="server_busy", headers={"Retry-After": "1"}) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        shape = _Shape(rid, int(time.time()), model_name, call, tokenizer, texts, jobs)
        if call.stream:
            return StreamingResponse(_stream(shape, runner, queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            await _collect(jobs, runner, request, queue)
        except GemmaforgeError as e:
            raise ApiError(400, str(e)) from None
        return shape.response()

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await generation(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await generation(request, chat=True)

    app.state.runner = runner
    return app


def _job(runner: Runner, tokenizer, ids: list[int], budget: int, tag: int, call: Call | None = None) -> Job:
    from ..generation.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max(budget, 1)) if call is None else \
        dataclasses.replace(call.params, max_new_tokens=max(budget, 1))
    ignore_eos = call is not None and call.ignore_eos
    prompt_logprobs = call.logprobs if call is not None and call.echo and call.logprobs is not None else None
    request = Request(list(ids), params, frozenset() if ignore_eos else tokenizer.stop_ids, budget,
                      n=1 if call is None else call.n, prompt_logprobs=prompt_logprobs)
    return Job(request, tag, () if call is None else call.stop, ignore_eos,
               watermark=None if call is None else call.watermark, texts=[[] for _ in range(request.n)])


async def _events(jobs: list[Job], queue: asyncio.Queue):
    """(tag, Output) items of every job of one request until all have ended."""
    open_jobs = len(jobs)
    while open_jobs:
        tag, item = await queue.get()
        if item is None:
            open_jobs -= 1
        elif isinstance(item, Exception):
            raise item
        else:
            jobs[tag].texts[item.index].append(item.text)
            yield tag, item


async def _collect(jobs: list[Job], runner: Runner, request: HttpRequest | None, queue=None) -> None:
    """Wait for ``jobs`` to finish; if the client disconnects meanwhile, abort them (rows freed)."""
    if queue is None:
        queue = asyncio.Queue()
        for job in jobs:
            runner.submit(job, queue)

    async def drain():
        async for _ in _events(jobs, queue):
            pass

    task = asyncio.ensure_future(drain())
    try:
        while not task.done():
            await asyncio.wait([task], timeout=0.5)
            if request is not None and not task.done() and await request.is_disconnected():
                for job in jobs:
                    runner.abort(job)
                await task
        task.result()
    finally:
        task.cancel()


async def _stream(shape: "_Shape", runner: Runner, queue: asyncio.Queue):
    """Server-sent events: one chunk per token (and text piece), the finish, usage, [DONE]. Leaving
    early (the client closed the connection: the generator is cancelled) aborts the jobs."""
    try:
        for chunk in shape.opening_chunks():
            yield _sse(chunk)
        async for tag, out in _events(shape.jobs, queue):
            yield _sse(shape.chunk(tag, out))
        if shape.call.include_usage:
            yield _sse(shape.usage_chunk())
        yield "data: [DONE]\n\n"
    except (GemmaforgeError, RuntimeError) as e:
        yield _sse(ApiError(400 if isinstance(e, GemmaforgeError) else 500, str(e)).body())
        yield "data: [DONE]\n\n"
    finally:
        for job in shape.jobs:
            if not job.done:
                runner.abort(job)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _prompt_texts(body: dict, call: Call, tokenizer) -> list[str]:
    """The prompts as text, for ``echo``: the strings given, or the decoded ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in call.prompts]


class _Shape:
    """Builds OpenAI's objects (whole responses and stream chunks) from the runner's outputs."""

    def __init__(self, rid, created, model, call: Call, tokenizer, texts, jobs):
        self.rid, self.created, self.model, self.call, self.tok = rid, created, model, call, tokenizer
        self.texts, self.jobs = texts, jobs
        self.chat = call.chat
        self._started: set[int] = set()  # choices whose echo / role chunk has been sent

    # ---- pieces ------------------------------------------------------------------------------------
    def _piece(self, t: int) -> str:
        return self.tok.decode([t])

    def _index(self, tag: int, i: int) -> int:
        return tag * self.call.n + i

    def _chat_entry(self, t, lp, top):
        piece = self._piece(t)
        alts = [] if top is None else [
            {"token": self._piece(a), "logprob": b, "bytes": list(self._piece(a).encode())} for a, b in zip(*top)]
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": alts}

    def _completion_lp(self, entries) -> dict:
        """entries: (token, logprob | None, top | None) -> OpenAI's legacy logprobs object."""
        tokens, lps, tops, offsets, at = [], [], [], [], 0
        for t, lp, top in entries:
            piece = self._piece(t)
            tokens.append(piece)
            lps.append(lp)
            tops.append(None if top is None else {self._piece(a): b for a, b in zip(*top)})
            offsets.append(at)
            at += len(piece)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _echo_entries(self, seq) -> list:
        prompt = seq.request.prompt
        if not seq.prompt_logprobs:
            return [(t, None, None) for t in prompt]
        return [(prompt[0], None, None)] + [
            (t, lp, (ids, lps)) for t, (lp, ids, lps) in zip(prompt[1:], seq.prompt_logprobs)]

    def _usage(self) -> dict:
        prompt = sum(len(j.request.prompt) for j in self.jobs)
        completion = sum(len(s.tokens) for j in self.jobs for s in j.seqs)
        cached = sum(j.seqs[0].cached_tokens for j in self.jobs if j.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # ---- a whole response ------------------------------------------------------------------------------
    def response(self) -> dict:
        choices = []
        for tag, job in enumerate(self.jobs):
            for seq, stream_text in zip(job.seqs, self._texts(job)):
                gen = [(t, lp, top) for t, lp, top in zip(seq.tokens, self._lps(seq), self._tops(seq))]
                if self.chat:
                    logprobs = None if self.call.logprobs is None else {
                        "content": [self._chat_entry(*e) for e in gen]}
                    choices.append({"index": self._index(tag, seq.index),
                                    "message": {"role": "assistant", "content": stream_text},
                                    "logprobs": logprobs, "finish_reason": seq.finish_reason})
                else:
                    text = (self.texts[tag] if self.call.echo else "") + stream_text
                    logprobs = None
                    if self.call.logprobs is not None:
                        logprobs = self._completion_lp((self._echo_entries(seq) if self.call.echo else []) + gen)
                    choices.append({"index": self._index(tag, seq.index), "text": text, "logprobs": logprobs,
                                    "finish_reason": seq.finish_reason})
        choices.sort(key=lambda c: c["index"])
        out = {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices, "usage": self._usage()}
        return self._marked(out)

    def _marked(self, out: dict) -> dict:
        """A watermarked completion names its key set (what a detector needs), as an extra field."""
        if self.call.watermark is not None:
            out["watermark"] = self.call.watermark
        return out

    def _texts(self, job: Job) -> list[str]:
        return ["".join(job.texts[i]) for i in range(len(job.seqs))]

    def _lps(self, seq):
        return seq.logprobs if seq.logprobs else [None] * len(seq.tokens)

    def _tops(self, seq):
        return seq.top if seq.top else [None] * len(seq.tokens)

    # ---- a stream ------------------------------------------------------------------------------------------
    def _chunk(self, choices: list) -> dict:
        out = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if self.call.include_usage:
            out["usage"] = None
        return self._marked(out)

    def opening_chunks(self) -> list[dict]:
        """Chat: the assistant role first (as OpenAI sends it); completions with echo: the prompt."""
        chunks = []
        for tag, job in enumerate(self.jobs):
            for i in range(job.request.n):
                if self.chat:
                    chunks.append(self._chunk([{"index": self._index(tag, i), "delta": {"role": "assistant",
                                                "content": ""}, "logprobs": None, "finish_reason": None}]))
        return chunks

    def chunk(self, tag: int, out) -> dict:
        idx = self._index(tag, out.index)
        job = self.jobs[tag]
        entry = None if out.token is None else (out.token, out.logprob, out.top)
        if self.chat:
            logprobs = None
            if self.call.logprobs is not None and entry is not None:
                logprobs = {"content": [self._chat_entry(*entry)]}
            delta = {"content": out.text} if out.text or out.finish_reason is None else {}
            return self._chunk([{"index": idx, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": out.finish_reason}])
        text, entries = out.text, [] if entry is None else [entry]
        if self.call.echo and idx not in self._started:
            self._started.add(idx)
            text = self.texts[tag] + text
            entries = self._echo_entries(job.seqs[out.index]) + entries
        logprobs = self._completion_lp(entries) if self.call.logprobs is not None else None
        return self._chunk([{"index": idx, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}])

    def usage_chunk(self) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self._usage()}
