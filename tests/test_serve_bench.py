"""The serving benchmark's load generator and report, against a stub OpenAI-compatible SSE server.

The stub streams a known number of one-token chunks after a known delay, so the statistics the
benchmark computes can be checked against what the stub did. No timing is asserted as performance:
only lower bounds the stub itself imposed.
"""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gemmaforge import serve_bench as sb
from gemmaforge.serve_bench_report import format_table
from gemmaforge.cli import main

DELAY_S = 0.05  # before the first chunk
GAP_S = 0.01  # between chunks


class _Stub(BaseHTTPRequestHandler):
    received: list = []
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.received.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        time.sleep(DELAY_S)
        n = body["max_tokens"] if body.get("ignore_eos") else 1
        for i in range(n):
            # split one event across two writes: the parser must join partial lines
            event = f'data: {json.dumps({"choices": [{"index": 0, "text": "x"}]})}\n\n'.encode()
            self.wfile.write(event[:7])
            self.wfile.flush()
            self.wfile.write(event[7:])
            self.wfile.flush()
            time.sleep(GAP_S)
        if body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
            self.wfile.write(f'data: {json.dumps({"choices": [], "usage": usage})}\r\n\r\n'.encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@pytest.fixture
def stub_url():
    _Stub.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_sse_parser_joins_partial_lines_and_multiline_data():
    p = sb.SSEParser()
    assert p.feed(b"data: {\"a\"") == []
    assert p.feed(b": 1}\r\n") == []
    assert p.feed(b": a comment\n\ndata: x\ndata: y\n\nevent: e\ndata: [DONE]\n\n") == ['{"a": 1}', "x\ny", "[DONE]"]


def test_percentile_interpolates():
    assert sb.percentile([], 50) is None
    assert sb.percentile([3.0], 99) == 3.0
    assert sb.percentile([1, 2, 3, 4], 50) == 2.5
    assert sb.percentile(range(101), 99) == 99


def test_load_generator_against_stub(stub_url):
    specs = [sb.RequestSpec(f"prompt {i}", 2, max_tokens) for i, max_tokens in enumerate([5, 3, 4, 6, 2])]
    done = []
    results, wall = asyncio.run(sb.run_level(stub_url, specs, 2, {"ignore_eos": True}, on_done=done.append))
    assert len(done) == len(specs) and all(r.ok for r in results), [r.error for r in results]
    assert [r.tokens for r in results] == [5, 3, 4, 6, 2]  # usage counted, in request order
    assert [len(r.token_times) for r in results] == [5, 3, 4, 6, 2]
    assert sorted(b["prompt"] for b in _Stub.received) == sorted(s.prompt for s in specs)
    body = _Stub.received[0]
    assert body["stream"] is True and body["temperature"] == 0.0 and body["stream_options"] == {"include_usage": True}

    stats = sb.summarize(results, wall)
    assert stats["ok"] == 5 and stats["errors"] == 0 and stats["short"] == 0 and stats["output_tokens"] == 20
    assert stats["prompt_tokens"] == 15
    assert stats["ttft_p50_ms"] >= DELAY_S * 1e3 and stats["ttft_p99_ms"] >= stats["ttft_p50_ms"]
    assert stats["itl_p50_ms"] >= GAP_S * 1e3 * 0.9  # the stub sleeps between chunks (timer granularity)
    assert stats["out_tok_s"] == pytest.approx(20 / wall) and stats["req_s"] == pytest.approx(5 / wall)
    assert 0 < stats["decode_tok_s_per_stream"] <= 1 / GAP_S * 1.1


def test_per_request_fields_and_refused_connection(stub_url):
    launch = sb.Launch("llama-cpp-python", ignore_eos="min_tokens")
    specs = [sb.RequestSpec("p", 1, 4)]
    results, _ = asyncio.run(sb.run_level(stub_url, specs, 1, launch.extra_body))
    assert _Stub.received[-1]["min_tokens"] == 4 and "ignore_eos" not in _Stub.received[-1]
    assert results[0].ok and results[0].tokens == 1  # no ignore_eos: the stub stopped early
    assert sb.summarize(results, 1.0)["short"] == 1

    dead = f"http://127.0.0.1:{sb.free_port()}"
    results, wall = asyncio.run(sb.run_level(dead, specs * 2, 2, {}))
    stats = sb.summarize(results, wall)
    assert stats["ok"] == 0 and stats["errors"] == 2 and stats["ttft_p99_ms"] is None
    assert "Connect" in stats["first_error"]


def test_missing_target_is_reported_not_raised(stub_url, tmp_path):
    s = sb.ServeBenchSettings(concurrency=(1, 2), requests=3, prompt_tokens=(8, 16), output_tokens=(2, 4),
                              targets=(stub_url, "llama-server"), reference=False)
    report = sb.run_serve_benchmark(s, llama_server=str(tmp_path / "no-such-llama-server"), progress=False)
    stub, llama = report["targets"]
    assert stub["status"] == "ok" and [lv["concurrency"] for lv in stub["levels"]] == [1, 2]
    assert all(lv["ok"] == 3 for lv in stub["levels"])
    assert len(_Stub.received) == 2 * 3 + 1 + 2  # the levels' requests and their warm-ups (C each)
    # every level and warm-up draws its own windows: no prompt cache carries over between levels
    assert len({b["prompt"] for b in _Stub.received}) == len(_Stub.received)
    assert llama["status"].startswith("missing: no llama-server binary") and llama["levels"] == []
    table = format_table(report)
    assert "missing: no llama-server binary" in table and stub_url in table
    assert "n/a" in table  # no baseline -> no ratios
    json.dumps(report)  # the report is plain JSON


def test_crashing_target_is_reported(tmp_path):
    s = sb.ServeBenchSettings(concurrency=(1,), requests=1, targets=("llama-server",), reference=False,
                              startup_timeout_s=30)
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'fake llama-server: cannot load model' >&2\nexit 3\n")
    fake.chmod(0o755)
    launch = sb.plan_target("llama-server", s, "m.gguf", sb.free_port(), str(fake))
    assert launch.missing is None and "--parallel" in launch.command and "-cb" in launch.command
    out = sb.bench_target(launch, s, [[]], [[]], tmp_path, sb.free_port(), progress=False)
    assert out["status"].startswith("crashed at startup (exit 3") and "cannot load model" in out["status"]


def test_settings_reject_bad_values():
    with pytest.raises(sb.GemmaforgeError, match="concurrency"):
        sb.ServeBenchSettings(concurrency=(0,))
    with pytest.raises(sb.GemmaforgeError, match="unknown target"):
        sb.ServeBenchSettings(targets=("vllm",))
    assert sb.ServeBenchSettings().slot_tokens % 128 == 0


def test_cli_help_and_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--concurrency" in out and "--llama-server" in out
    assert main(["bench", "serve", "--concurrency", "1,x"]) == 2
    assert "--concurrency must be comma-separated integers" in capsys.readouterr().err
    assert main(["bench", "serve", "--model", "/nonexistent.bin", "--no-reference"]) == 2
    assert "must be a .gguf file" in capsys.readouterr().err
