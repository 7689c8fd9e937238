"""The engine thread of the server: one Scheduler, stepped continuously, shared by every request.

    HTTP handlers (asyncio)                          engine thread (this module)
    runner.submit(job) ──inbox──▶  admit into the Scheduler ─▶ step() ─▶ events
    async for out in job.stream()  ◀──call_soon_threadsafe── text, token, log-probs per sequence

The scheduler is not thread-safe and the model call blocks, so both live on one thread; handlers only
put jobs and aborts into the inbox and read their own asyncio queue. ``gemmaforge serve`` runs this
loop on its main thread (``serve_here``) and uvicorn on another: see ``Runner.__init__`` for why. A
step is one decode over the whole pool plus at most one prefill chunk of a newcomer
(``decode_during_prefill``), so a long prompt never stalls the running streams for more than one chunk.

Text is made here, not in the handlers: a stop string is found as soon as its last token arrives,
and the sequence is aborted in the same step, which frees its row for the next request.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from ..errors import GemmaforgeError
from ..generation.api import TextStream
from ..generation.scheduler import Request, Scheduler, Sequence
from .metrics import Metrics


class QueueFull(GemmaforgeError):
    """Every row is busy and the waiting queue is at its bound: the client should retry later."""


@dataclass
class Output:
    """What one sequence produced in one step (or its end)."""

    index: int  # sample index within the job (OpenAI's choice index within one prompt)
    text: str  # text released this step (stop strings removed, incomplete characters held back)
    token: int | None  # the token generated this step (None: none, e.g. the end of a held-back text)
    logprob: float | None = None
    top: tuple[list[int], list[float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" once finished


@dataclass
class Job:
    """One prompt of a request as the runner sees it: token ids in, ``(tag, Output)`` items out
    through the request's queue (shared by the jobs of one request; ``None`` ends a job)."""

    request: Request
    tag: int = 0  # which prompt of the HTTP request this is
    stop: tuple[str, ...] = ()  # stop strings
    ignore_eos: bool = False  # generate to the budget: no stop ids (benchmarks do this)
    watermark: str | None = None  # the name of the server's SynthID key set that marks this job
    created: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    texts: list[list[str]] = field(default_factory=list)  # per sequence: the pieces received (event-loop side)
    seqs: list[Sequence] = field(default_factory=list)
    streams: list[TextStream] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: list[float] = field(default_factory=list)
    done: bool = False

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.tag, item))


class Runner:
    def __init__(self, engine, tokenizer, *, num_rows: int, max_len: int, max_queue: int = 64,
                 prefix_reuse: bool = True, slack: int = 16, watermarks: dict | None = None,
                 own_thread: bool = True):
        """``own_thread=False``: ``start()`` starts nothing and the caller runs the loop with
        ``serve_here()``, from the thread that loaded the model. That is the fast choice on CPU:
        OpenMP keeps one thread team per thread that runs parallel torch code, and with a second
        team libgomp counts more managed threads than cores and shortens its spin-waits (our
        reading of the measurements), so every small parallel op of the step pays a wake-up: a
        decode step on a new thread ran at half the speed of the same step on the loading thread
        (docs/serving.md, "Threads")."""
        self.engine, self.tokenizer = engine, tokenizer
        self.scheduler = Scheduler(engine, num_rows, max_len, slack=slack, decode_during_prefill=True,
                                   prefix_reuse=prefix_reuse)
        # SynthID-Text key sets by name (docs/watermark.md): each job names the set that marks it, or
        # none; the HTTP side decides which (the server's --watermark-requests policy).
        self.watermarks = dict(watermarks or {})
        self._marks: dict[int, object] = {}  # Request.id -> the watermark of a running job
        if self.watermarks:
            from ..watermark import attach_watermark

            attach_watermark(self.scheduler, lambda request: self._marks.get(request.id))
        self.max_queue = max_queue
        self.metrics = Metrics()
        self._inbox: deque = deque()
        self._jobs: dict[int, Job] = {}  # by id(sequence)
        self._wake = threading.Condition()
        self._stopping = False
        self.draining = False  # no new jobs (SIGTERM): running ones finish
        self._own_thread = own_thread
        self._thread = threading.Thread(target=self._run, name="gemmaforge-engine", daemon=True)
        self.failure: BaseException | None = None

    @property
    def max_len(self) -> int:
        return self.scheduler.max_len

    @property
    def num_rows(self) -> int:
        return self.scheduler.num_rows

    def start(self) -> None:
        if self._own_thread:
            self._thread.start()

    def serve_here(self) -> None:
        """The engine loop on the calling thread (``own_thread=False``), until ``stop()``."""
        try:
            self._run()
        except BaseException:  # noqa: BLE001 - a bug: _fail told every waiting request; the caller reads .failure
            if self.failure is None:
                raise
            traceback.print_exc()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # ---- from the HTTP side (any thread) ------------------------------------------------------------
    def submit(self, job: Job, queue: asyncio.Queue) -> Job:
        """Queue ``job`` (from the event loop's thread); its outputs arrive on ``queue``. Raises
        QueueFull when the waiting queue is at its bound or the server is draining."""
        if self.failure is not None:
            raise RuntimeError(f"the engine failed earlier ({self.failure!r}): restart the server")
        if self.draining or self._stopping:
            raise QueueFull("the server is shutting down: send the request to another replica")
        waiting = len(self.scheduler.waiting) + len(self._inbox)
        free = self.num_rows - self.scheduler.running
        if waiting >= self.max_queue and free < job.request.n:
            raise QueueFull(f"{waiting} requests are already waiting for a slot (--max-queue {self.max_queue}): "
                            "retry later")
        job.loop, job.queue = asyncio.get_running_loop(), queue
        with self._wake:
            self._inbox.append(("submit", job))
            self._wake.notify()
        return job

    def abort(self, job: Job) -> None:
        """The client went away: free the job's rows at the next step boundary."""
        with self._wake:
            self._inbox.append(("abort", job))
            self._wake.notify()

    def load(self) -> dict:
        """Numbers for /metrics and /health: rows in use, requests waiting, KV tokens held."""
        s = self.scheduler
        live = [q for q in s.rows if q is not None]
        return {
            "running": len(live),
            "waiting": len(s.waiting) + len(self._inbox),
            "kv_tokens_used": sum(s.cache.lengths[q.row] for q in live if q.row is not None),
            "kv_tokens_total": s.num_rows * s.max_len,
            "kv_rows_total": s.num_rows,
        }

    # ---- the engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._inbox and not self.scheduler.has_work() and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = list(self._inbox), deque()
                for kind, job in inbox:
                    self._admit(job) if kind == "submit" else self._abort(job)
                if self.scheduler.has_work():
                    self._dispatch(self.scheduler.step())
        except BaseException as e:  # noqa: BLE001 - the server must answer, not hang: see _fail
            self._fail(e)
            raise

    def _admit(self, job: Job) -> None:
        if job.watermark is not None:
            self._marks[job.request.id] = self.watermarks[job.watermark]
        try:
            job.seqs = self.scheduler.submit(job.request)
        except GemmaforgeError as e:
            self._marks.pop(job.request.id, None)
            job.put(e)
            return
        stop_ids = frozenset() if job.ignore_eos else self.tokenizer.stop_ids
        job.streams = [TextStream(self.tokenizer, job.stop, stop_ids) for _ in job.seqs]
        job.last_token_at = [0.0] * len(job.seqs)
        for s in job.seqs:
            self._jobs[id(s)] = job
        self.metrics.prompt_tokens += len(job.request.prompt)

    def _abort(self, job: Job) -> None:
        for s in job.seqs:
            self.scheduler.abort(s)
            self._jobs.pop(id(s), None)
        self._marks.pop(job.request.id, None)
        if not job.done:
            job.done = True
            self.metrics.aborted += 1
            job.put(None)

    def _dispatch(self, events) -> None:
        now = time.monotonic()
        for ev in events:
            job = self._jobs.get(id(ev.seq))
            if job is None:
                continue
            seq, stream = ev.seq, job.streams[ev.seq.index]
            if ev.token is None:  # prompt scoring only
                text = ""
            else:
                self.metrics.completion_tokens += 1
                if job.first_token_at is None:
                    job.first_token_at = now
                    self.metrics.ttft.observe(now - job.created)
                    self.metrics.cached_tokens += job.seqs[0].cached_tokens  # the prefilled row's
                elif job.last_token_at[seq.index]:
                    self.metrics.inter_token.observe(now - job.last_token_at[seq.index])
                job.last_token_at[seq.index] = now
                text = stream.feed(ev.token)
            finish = seq.finish_reason if ev.finished else None
            if stream.done:  # a stop id or a stop string ended the text
                if not ev.finished:
                    self.scheduler.abort(seq)  # a stop string: end it now, free the row this step
                finish = "stop"
            if finish is not None:
                text += stream.finish()
                seq.finish_reason = finish
                self._jobs.pop(id(seq), None)
            top = seq.top[-1] if ev.token is not None and seq.top else None
            job.put(Output(seq.index, text, ev.token, ev.logprob, top, seq.finish_reason if finish else None))
            # All sequences of a job may finish in one step, in row order: the job ends only after
            # the last of their final outputs, or a consumer would stop before reading the others.
            if finish is not None and not any(id(s) in self._jobs for s in job.seqs):
                job.done = True
                self._marks.pop(job.request.id, None)
                self.metrics.requests[seq.finish_reason] = self.metrics.requests.get(seq.finish_reason, 0) + 1
                job.put(None)

    def _fail(self, error: BaseException) -> None:
        """The engine thread died (a bug): every waiting handler gets an error instead of hanging."""
        self.failure = error
        self._stopping = True
        for job in {id(j): j for j in self._jobs.values()}.values():
            job.put(RuntimeError(f"the engine failed: {type(error).__name__}: {error}"))


def pool_shape(config, budget_mb: float, max_batch: int, dtype_bytes: int, slack: int = 16) -> tuple[int, int]:
    """(rows, tokens per row) of a KV cache that fits ``budget_mb``: ``max_batch`` rows, each as
    long as the budget allows up to the model's context. Local layers hold a fixed ring
    (window + slack slots) whatever the length, so the budget goes to the global layers' columns
    (docs/serving.md, "The KV budget")."""
    per_slot = 2 * config.num_kv_heads * config.head_dim * dtype_bytes  # K and V of one token, one layer
    local = [i for i in range(config.num_layers) if config.is_local(i)]
    n_global = config.num_layers - len(local)
    ring_bytes = len(local) * (config.sliding_window + slack + 1) * per_slot
    per_row = budget_mb * 2**20 / max_batch
    if n_global == 0:
        length = config.max_position_embeddings if per_row >= ring_bytes else 0
    else:
        length = int((per_row - ring_bytes) // (n_global * per_slot)) - 1
    length = min(length, config.max_position_embeddings)
    floor = min(config.sliding_window + slack, config.max_position_embeddings)
    if length < floor:
        need = max_batch * (ring_bytes + (floor + 1) * n_global * per_slot) / 2**20
        raise GemmaforgeError(f"--kv-budget-mb {budget_mb:g} leaves fewer than {floor} tokens per row at "
                              f"--max-batch {max_batch}: give at least {need:.0f} MB or fewer rows")
    return max_batch, length
