"""``gemmaforge serve``: an OpenAI-compatible HTTP server with continuous batching.

    gemmaforge serve                                   # the embedded model on http://127.0.0.1:8000
    gemmaforge serve --model google/gemma-2-2b-it --quant int8 --api-key sk-local --max-batch 16

Everything about the routes, fields, batching, prefix reuse and the KV budget is in docs/serving.md.
SIGTERM (or Ctrl-C) stops admitting requests, lets the running ones finish, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from ..errors import GemmaforgeError
from .generate import add_model_arguments, load_model_and_tokenizer, make_engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this key (repeatable; also GEMMAFORGE_API_KEY); none = no authentication")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    p.add_argument("--max-batch", type=int, default=8, help="KV-cache rows: sequences decoded together (default 8)")
    p.add_argument("--kv-budget-mb", type=float, default=512,
                   help="memory for the KV cache; each row gets an equal share (default 512)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: the row length)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row; more get 503 (default 64)")
    p.add_argument("--no-prefix-reuse", action="store_true", help="always prefill the whole prompt")
    p.add_argument("--watermark", action="append", default=[], metavar="[NAME=]KEYFILE",
                   help="SynthID-Text keys the server holds (repeatable; NAME defaults to the file's stem; "
                        "docs/watermark.md)")
    p.add_argument("--watermark-requests", choices=("all", "opt-in"), default="all",
                   help="all: every completion is marked (the first keys, or the request's 'watermark': NAME); "
                        "opt-in: only requests with 'watermark': true or NAME (default: all)")


def _model_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        from ..default_model import default_model_path

        return Path(default_model_path()).stem
    return Path(args.model).stem if Path(args.model).exists() else str(args.model)


def _watermark_keys(specs: list[str]) -> dict:
    """``[NAME=]KEYFILE`` flags -> {name: WatermarkConfig}, in the order given (the first is the default)."""
    from ..watermark import WatermarkConfig

    marks = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or Path(spec).exists():
            name, path = Path(spec).stem, spec
        if name in marks:
            raise GemmaforgeError(f"--watermark: two key sets are named {name!r}: name them, e.g. --watermark "
                                  f"tenant-a={path}")
        marks[name] = WatermarkConfig.load(path)
    return marks


def build(args: argparse.Namespace, own_thread: bool = True):
    """(app, runner) from parsed arguments: what ``run`` serves and what tests can build in-process."""
    import torch

    from ..serving.app import create_app
    from ..serving.runner import Runner, pool_shape

    if not 1 <= args.port <= 65535:
        raise GemmaforgeError(f"--port must be in [1, 65535], got {args.port}")
    for name, minimum in (("max_batch", 1), ("max_queue", 0)):
        if getattr(args, name) < minimum:
            raise GemmaforgeError(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(args, name)}")
    if not 0 < args.kv_budget_mb:
        raise GemmaforgeError(f"--kv-budget-mb must be > 0, got {args.kv_budget_mb}")
    keys = tuple(args.api_key) + tuple(k for k in [os.environ.get("GEMMAFORGE_API_KEY")] if k)
    marks = _watermark_keys(args.watermark)  # a bad keys file fails before the slow model load
    model, tokenizer = load_model_and_tokenizer(args)
    dtype_bytes = torch.finfo(model.final_norm.weight.dtype).bits // 8
    rows, length = pool_shape(model.config, args.kv_budget_mb, args.max_batch, dtype_bytes)
    if args.max_prompt_tokens is not None and not 1 <= args.max_prompt_tokens < length:
        raise GemmaforgeError(f"--max-prompt-tokens must be in [1, {length - 1}] (the row length), "
                              f"got {args.max_prompt_tokens}")
    engine = make_engine(model, args)
    runner = Runner(engine, tokenizer, num_rows=rows, max_len=length, max_queue=args.max_queue,
                    prefix_reuse=not args.no_prefix_reuse,
                    watermarks={name: m.watermark(engine.device) for name, m in marks.items()},
                    own_thread=own_thread)
    app = create_app(runner, tokenizer, model_name=_model_name(args), api_keys=keys,
                     max_prompt_tokens=args.max_prompt_tokens,
                     watermark_default=next(iter(marks), None) if args.watermark_requests == "all" else None)
    return app, runner


def run(args: argparse.Namespace) -> int:
    """uvicorn on a thread of its own; this thread, which loaded the model, runs the engine loop
    (serving.runner.Runner: one OpenMP thread team, the fast step)."""
    import threading

    import uvicorn

    app, runner = build(args, own_thread=False)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)  # off the main thread it installs no signal handlers: ours below

    def stop(sig, frame):
        runner.draining = True  # new requests get 503 while the running ones finish
        server.handle_exit(sig, frame)  # uvicorn's graceful stop; the lifespan's end stops the runner

    def http():
        try:
            server.run()
        finally:
            runner.stop()  # also when uvicorn could not start (port in use): the engine loop returns

    print(f"gemmaforge: serving {_model_name(args)} on http://{args.host}:{args.port} "
          f"({runner.num_rows} rows x {runner.max_len} tokens; warming up)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    web = threading.Thread(target=http, name="gemmaforge-http", daemon=True)
    web.start()
    runner.serve_here()
    server.should_exit = True  # the runner failed (a bug, traceback printed) or the server stopped
    web.join()
    if not server.started:
        raise GemmaforgeError(f"could not serve on {args.host}:{args.port} (see the message above): "
                              "is the port in use? pick another with --port")
    return 0 if runner.failure is None else 1
