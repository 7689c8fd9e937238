"""Serving benchmark: ``gemmaforge serve`` against llama.cpp's ``llama-server`` and ``llama_cpp.server``.

Bounded, closed-loop load on loopback: for each concurrency C, C streaming clients share a fixed list
of requests (each client sends its next request when the previous one has finished). Every target is
started by the benchmark on a free loopback port, serves the same GGUF file with the same thread
count, and is stopped afterwards. Per target and level:

    req/s, out tok/s     finished requests and generated tokens over the level's wall time
    TTFT p50/p99         request sent -> first generated text (prefill + queueing)
    ITL p50/p99          gaps between consecutive streamed chunks with text, all requests pooled
    decode tok/s/stream  median over requests of (tokens - 1) / (last chunk - first chunk)
    peak RSS             VmHWM of the server process: its peak since start, read after the level

Requests are ``/v1/completions`` with ``stream: true``, temperature 0 and a fixed ``max_tokens`` that
the server must reach (``ignore_eos``; ``llama_cpp.server`` knows only ``min_tokens``). Prompts are
windows of a fixed text (Python's own documentation) of lengths drawn with a fixed seed; each level
draws its own windows, the same for every target, so no server can reuse a previous level's prompt
cache. Before each level C short requests run untimed, so compilation or warm-up of batch shapes
is not timed. The gemmaforge reference is the Engine itself (what ``gemmaforge generate`` runs), batch
1, timed in its own process while no server runs (``reference_decode``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .commands.generate import QUANTS  # gemmaforge serve --quant
from .errors import GemmaforgeError
from .serve_bench_report import goals

TARGETS = ("gemmaforge", "llama-server", "llama-cpp-python")
_MARK = "GEMMAFORGE-SERVE-BENCH-REFERENCE "  # the reference child prints its result after this


@dataclass(frozen=True)
class ServeBenchSettings:
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    requests: int = 16  # per level
    prompt_tokens: tuple[int, int] = (64, 256)  # drawn uniformly, inclusive
    output_tokens: tuple[int, int] = (32, 128)
    threads: int = 2
    quant: str = "auto"  # gemmaforge's weights: the default, the GGUF file as stored (what llama.cpp serves)
    compile: str = "auto"
    seed: int = 0
    targets: tuple[str, ...] = TARGETS  # names from TARGETS, or URLs of servers already running
    warmup: bool = True
    reference: bool = True
    reference_repeats: int = 2
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 600.0

    def __post_init__(self):
        for name in ("concurrency", "prompt_tokens", "output_tokens", "targets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.concurrency or min(self.concurrency) < 1:
            raise GemmaforgeError(f"concurrency levels must be >= 1, got {list(self.concurrency)}")
        for name in ("requests", "threads", "reference_repeats"):
            if getattr(self, name) < 1:
                raise GemmaforgeError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("prompt_tokens", "output_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise GemmaforgeError(f"{name.replace('_', '-')} must be MIN-MAX with 1 <= MIN <= MAX, got {lo}-{hi}")
        if self.quant not in QUANTS:
            raise GemmaforgeError(f"unknown quant {self.quant!r}: choose from {', '.join(QUANTS)}")
        if self.compile not in ("auto", "on", "off"):
            raise GemmaforgeError(f"unknown compile setting {self.compile!r}: choose auto, on or off")
        if not self.targets:
            raise GemmaforgeError("no targets: give at least one of " + ", ".join(TARGETS))
        for t in self.targets:
            if t not in TARGETS and not t.startswith(("http://", "https://")):
                raise GemmaforgeError(f"unknown target {t!r}: choose from {', '.join(TARGETS)} or give a server URL")

    @property
    def slot_tokens(self) -> int:
        """Context per concurrent stream: the longest prompt and output, plus room for the prompt's
        tokenization by another tokenizer than ours (a window decoded to text and re-encoded)."""
        need = self.prompt_tokens[1] + self.output_tokens[1] + 64
        return -(-need // 128) * 128


# ---- the requests -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    prompt_tokens: int  # as our tokenizer counts the window; the server's count is in the result
    max_tokens: int


def corpus_text(chars: int = 60_000) -> str:
    """A fixed English text with code in it: Python's documentation topics, in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:chars]


def make_requests(tokenizer, count: int, prompt_range, output_range, seed: int, ids=None) -> list[RequestSpec]:
    """``count`` windows of the fixed text, lengths and offsets drawn with ``seed``."""
    ids = ids if ids is not None else tokenizer.encode(corpus_text(), add_bos=False)
    rng = random.Random(seed)
    specs = []
    for _ in range(count):
        length = rng.randint(*prompt_range)
        if length > len(ids):
            raise GemmaforgeError(f"prompts of {length} tokens are longer than the fixed text ({len(ids)} tokens)")
        start = rng.randrange(0, len(ids) - length + 1)
        specs.append(RequestSpec(tokenizer.decode(ids[start:start + length]), length, rng.randint(*output_range)))
    return specs


# ---- streaming client ---------------------------------------------------------------------------------
class SSEParser:
    """Server-sent events from arbitrary byte chunks -> the ``data`` of each complete event."""

    def __init__(self):
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return events
            line, self._buf = self._buf[:nl].rstrip(b"\r").decode("utf-8"), self._buf[nl + 1:]
            if not line:  # a blank line ends the event
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                self._data.append(line[5:].removeprefix(" "))
            # other fields (event:, id:, retry:) and comments (":") carry nothing the benchmark needs


@dataclass
class RequestResult:
    ok: bool
    start: float
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    completion_tokens: int | None = None  # from the server's usage chunk, when it sends one
    prompt_tokens: int | None = None
    end: float = 0.0
    error: str | None = None
    max_tokens: int | None = None  # what was asked for: fewer tokens means the server stopped early

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.token_times)


def _chunk_text(obj: dict) -> str:
    choice = (obj.get("choices") or [{}])[0]
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


async def stream_request(client, url: str, body: dict) -> RequestResult:
    """One streaming completion; never raises for a server's fault (it is recorded in the result)."""
    res = RequestResult(ok=False, start=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                res.error = f"HTTP {resp.status_code}: {text[:200]}"
                return res
            parser = SSEParser()
            done = False
            async for chunk in resp.aiter_raw():
                now = time.perf_counter()
                for data in parser.feed(chunk):
                    if data.strip() == "[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        res.error = f"server error: {json.dumps(obj['error'])[:200]}"
                        return res
                    if _chunk_text(obj):
                        res.token_times.append(now)
                    usage = obj.get("usage")
                    if usage:
                        res.completion_tokens = usage.get("completion_tokens")
                        res.prompt_tokens = usage.get("prompt_tokens")
                if done:
                    break
            res.ok = done and bool(res.token_times)
            if not res.ok:
                res.error = "stream ended without [DONE]" if not done else "no text streamed"
    except Exception as e:  # connection refused or reset, timeout, bad JSON: the server's failure
        res.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        res.end = time.perf_counter()
    return res


def request_body(spec: RequestSpec, extra: dict) -> dict:
    return {"prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}


async def run_level(base_url: str, specs: list[RequestSpec], concurrency: int, extra=None,
                    timeout_s: float = 600.0, on_done=None) -> tuple[list[RequestResult], float]:
    """``concurrency`` clients take ``specs`` in order until none is left -> (results in spec order, wall s).

    ``extra``: fields added to every body, a dict or a function of the request."""
    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    results: list[RequestResult | None] = [None] * len(specs)
    pending = iter(range(len(specs)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        async def client_loop():
            for i in pending:  # one shared iterator: each index is taken by exactly one client
                fields = extra(specs[i]) if callable(extra) else (extra or {})
                results[i] = await stream_request(client, url, request_body(specs[i], fields))
                results[i].max_tokens = specs[i].max_tokens
                if on_done is not None:
                    on_done(results[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(min(concurrency, len(specs)))))
        wall = time.perf_counter() - t0
    return results, wall


def percentile(values, q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [(r.token_times[0] - r.start) * 1e3 for r in ok]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    streams = [(r.tokens - 1) / (r.token_times[-1] - r.token_times[0])
               for r in ok if r.tokens > 1 and r.token_times[-1] > r.token_times[0]]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    short = sum(1 for r in ok if r.max_tokens is not None and r.tokens < r.max_tokens)
    return {
        "requests": len(results), "ok": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
        "short": short,
        "wall_s": wall, "req_s": len(ok) / wall if wall > 0 else None,
        "output_tokens": tokens, "out_tok_s": tokens / wall if wall > 0 else None,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok) or None,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99),
        "decode_tok_s_per_stream": percentile(streams, 50),
    }


# ---- the servers --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM: the process's peak resident memory since it started."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def find_llama_server(path: str | None) -> str | None:
    path = path or os.environ.get("LLAMA_SERVER") or "llama-server"
    if os.sep in path:
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    return shutil.which(path)


@dataclass
class Launch:
    """How to start one target, or why it cannot be: ``missing`` set means it is not run."""

    name: str
    command: list[str] = field(default_factory=list)
    health_path: str = "/health"
    ignore_eos: str = "ignore_eos"  # how this server is told to generate exactly max_tokens
    missing: str | None = None
    url: str | None = None  # an external server: not started, not stopped, no RSS

    def extra_body(self, spec: RequestSpec) -> dict:
        if self.ignore_eos == "min_tokens":  # EOS masked until the budget is reached
            return {"min_tokens": spec.max_tokens}
        return {"ignore_eos": True}


def plan_target(name: str, s: ServeBenchSettings, gguf: str, port: int, llama_server: str | None) -> Launch:
    host, n = "127.0.0.1", max(s.concurrency)
    if name.startswith(("http://", "https://")):
        return Launch(name, url=name.rstrip("/"))
    if name == "gemmaforge":
        cmd = [sys.executable, "-m", "gemmaforge", "serve", "--model", gguf, "--quant", s.quant,
               "--compile", s.compile, "--host", host, "--port", str(port), "--max-batch", str(n),
               "--max-queue", str(max(64, s.requests))]
        return Launch(name, cmd, "/health")
    if name == "llama-server":
        binary = find_llama_server(llama_server)
        if binary is None:
            return Launch(name, missing=f"missing: no llama-server binary ({llama_server or 'llama-server'}; "
                                        "pass --llama-server PATH or set LLAMA_SERVER)")
        cmd = [binary, "-m", gguf, "-t", str(s.threads), "-tb", str(s.threads), "--parallel", str(n), "-cb",
               "-c", str(n * s.slot_tokens), "--host", host, "--port", str(port)]
        return Launch(name, cmd, "/health")
    if name == "llama-cpp-python":
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            return Launch(name, missing="missing: llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')")
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(s.threads),
               "--n_threads_batch", str(s.threads), "--n_ctx", str(s.slot_tokens), "--host", host, "--port", str(port),
               "--interrupt_requests", "False"]  # by default a new request cancels the stream in progress
        return Launch(name, cmd, "/v1/models", ignore_eos="min_tokens")  # it has no /health, no ignore_eos
    raise GemmaforgeError(f"unknown target {name!r}")


class Server:
    """A started target process: waits for its health route, stops it (SIGTERM, then SIGKILL)."""

    def __init__(self, launch: Launch, port: int, log_path: Path, threads: int):
        self.launch, self.url, self.log_path = launch, f"http://127.0.0.1:{port}", log_path
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), NO_PROXY="127.0.0.1")
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(launch.command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " / ".join(t.strip() for t in text[-lines:])[:300]

    def exited(self) -> str | None:
        rc = self.proc.poll()
        return None if rc is None else f"exit {rc}: {self.log_tail()}"

    def wait_ready(self, timeout_s: float) -> str | None:
        """None once the health route answers 200; else why not."""
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if (why := self.exited()) is not None:
                    return f"crashed at startup ({why})"
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + self.launch.health_path).status_code == 200:
                        return None
                time.sleep(0.5)
        return f"not ready after {timeout_s:.0f} s: {self.log_tail()}"

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def _progress(desc: str, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, leave=False)


def bench_target(launch: Launch, s: ServeBenchSettings, levels: list[list[RequestSpec]],
                 warmups: list[list[RequestSpec]], logdir: Path, port: int, progress: bool = True) -> dict:
    """Every level against one target; a missing or crashing target gives ``status`` != "ok", never raises."""
    out = {"target": launch.name, "command": launch.command or None, "url": launch.url, "levels": []}
    if launch.missing:
        return out | {"status": launch.missing}
    server = None
    try:
        if launch.url is None:
            server = Server(launch, port, logdir / f"{launch.name}.log", s.threads)
            out["log"] = str(server.log_path)
            t0 = time.perf_counter()
            why = server.wait_ready(s.startup_timeout_s)
            out["startup_s"] = time.perf_counter() - t0
            if why:
                return out | {"status": why}
        url = launch.url or server.url
        for c, specs, warm in zip(s.concurrency, levels, warmups):
            if s.warmup:
                asyncio.run(run_level(url, warm, c, launch.extra_body, s.request_timeout_s))
            bar = _progress(f"{launch.name} C={c}", len(specs), progress)
            try:
                results, wall = asyncio.run(run_level(url, specs, c, launch.extra_body, s.request_timeout_s,
                                                      on_done=lambda r: bar.update(1)))
            finally:
                bar.close()
            level = {"concurrency": c} | summarize(results, wall)
            level["peak_rss_mb"] = server.peak_rss_mb() if server else None
            out["levels"].append(level)
            if server is not None and (why := server.exited()) is not None:
                return out | {"status": f"crashed during C={c} ({why})"}
        return out | {"status": "ok"}
    finally:
        if server is not None:
            server.stop()


# ---- the reference: the Engine itself, batch 1 --------------------------------------------------------
def reference_decode(gguf: str, s: ServeBenchSettings) -> dict:
    """Decode tok/s of ``gemmaforge generate``'s path (Engine, greedy, batch 1) for ``s.quant``, in a
    child process (its own threads and memory; no server runs meanwhile). Never raises."""
    payload = {"model": gguf, "quant": s.quant, "compile": s.compile, "threads": s.threads,
               "prompt_len": sum(s.prompt_tokens) // 2, "new_tokens": s.output_tokens[1],
               "repeats": s.reference_repeats, "seed": s.seed}
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads), MKL_NUM_THREADS=str(s.threads))
    proc = subprocess.run([sys.executable, "-m", "gemmaforge.serve_bench", json.dumps(payload)], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return payload | json.loads(line[len(_MARK):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return payload | {"error": f"failed (exit {proc.returncode}): {tail[:200]}"}


def _reference_child(payload: str) -> None:
    import torch

    from .benchmark import BenchSettings, decode_timing, random_prompts
    from .generation.engine import Engine
    from .generation.sampling import SamplingParams
    from .quant import load_quantized

    d = json.loads(payload)
    torch.set_num_threads(d["threads"])
    model = load_quantized(d["model"], d["quant"])  # what `gemmaforge serve --quant` loads
    engine = Engine(model) if d["compile"] != "off" else Engine(model, fast=False)
    bs = BenchSettings(prompt_len=d["prompt_len"], new_tokens=d["new_tokens"], batch=1, threads=d["threads"],
                       repeats=d["repeats"], ppl_chars=0, variants=())
    prompt = random_prompts(model.config.vocab_size, 1, bs.prompt_len, d["seed"])
    greedy = SamplingParams(temperature=0.0, max_new_tokens=bs.new_tokens)

    def generate(mark):
        for i, _ in enumerate(engine.steps(prompt, greedy, max_new_tokens=bs.new_tokens)):
            if i == 0:
                mark()

    ttft, tok_s = decode_timing(generate, bs, 1)
    print(_MARK + json.dumps({"decode_tok_s": tok_s, "ttft_ms": ttft * 1e3}), flush=True)


# ---- one run ------------------------------------------------------------------------------------------
def run_serve_benchmark(s: ServeBenchSettings, model: str | None = None, llama_server: str | None = None,
                        logdir: Path | None = None, progress: bool = True) -> dict:
    """Every target of ``s`` on the GGUF ``model`` (default: the embedded one) -> the report."""
    from .tokenizer import load_tokenizer

    if model is None:
        from .default_model import default_model_path

        model = str(default_model_path())
    if not (os.path.isfile(model) and model.endswith(".gguf")):
        raise GemmaforgeError(f"--model must be a .gguf file (every target serves the same file), got {model!r}")
    tok = load_tokenizer(model)
    ids = tok.encode(corpus_text(), add_bos=False)
    levels = [make_requests(tok, s.requests, s.prompt_tokens, s.output_tokens, s.seed + i, ids)
              for i in range(len(s.concurrency))]
    warmups = [make_requests(tok, c, s.prompt_tokens, (4, 4), s.seed + 1000 + i, ids)
               for i, c in enumerate(s.concurrency)]
    report = {"model": model, "settings": asdict(s), "environment": serve_environment(s.threads, llama_server),
              "targets": []}
    with contextlib.ExitStack() as stack:
        if logdir is None:
            logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gemmaforge-serve-bench-")))
        logdir.mkdir(parents=True, exist_ok=True)
        _stop_servers_on_sigterm(stack)
        if s.reference and "gemmaforge" in s.targets:
            from tqdm import tqdm

            tqdm.write("gemmaforge reference: Engine decode, batch 1 ...", file=sys.stderr)
            report["reference"] = reference_decode(model, s)
        for name in s.targets:
            port = free_port()
            launch = plan_target(name, s, model, port, llama_server)
            if progress and not launch.missing and launch.url is None:
                from tqdm import tqdm

                tqdm.write(f"starting {name} on port {port} ...", file=sys.stderr)
            report["targets"].append(bench_target(launch, s, levels, warmups, logdir, port, progress))
    report["goals"] = goals(report)
    return report


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _stop_servers_on_sigterm(stack: contextlib.ExitStack) -> None:
    """SIGTERM unwinds like Ctrl-C, so every started server is stopped (``Server.stop`` in a finally)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
        stack.callback(signal.signal, signal.SIGTERM, previous)


def serve_environment(threads: int, llama_server: str | None) -> dict:
    from .benchmark import environment

    env = environment(threads)
    binary = find_llama_server(llama_server)
    env["llama_server"] = binary
    if binary:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
            env["llama_server_version"] = next((line for line in (out.stdout + out.stderr).splitlines()
                                                if line.startswith("version")), None)
    for pkg in ("httpx",):
        from importlib.metadata import PackageNotFoundError, version

        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    return env


if __name__ == "__main__":
    _reference_child(sys.argv[1])
