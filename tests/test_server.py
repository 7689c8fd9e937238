"""`gemmaforge serve` with the real `openai` client, on the embedded Gemma 3 270M, on loopback.

Oracles: the library (`gemmaforge.generate`, the model's own log-probs) for content; the OpenAI
response shapes for form; the same request alone and inside a busy batch for batching. Servers run
in-process (uvicorn in a thread, free port) except the SIGTERM test, which needs its own process.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

import gemmaforge
from gemmaforge.chat import encode_chat
from gemmaforge.commands import serve as serve_cmd
from gemmaforge.generation import Engine
from gemmaforge.serving.app import create_app
from gemmaforge.serving.runner import Runner, pool_shape

KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on a free loopback port in a daemon thread, stopped by ``close``."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def served(embedded_gguf):
    model = gemmaforge.load(embedded_gguf, dtype=torch.float32)
    tok = gemmaforge.load_tokenizer(embedded_gguf)
    return model, tok


def make_server(served, *, rows=4, max_len=512, max_queue=16, keys=(KEY,), max_prompt_tokens=None):
    model, tok = served
    runner = Runner(Engine.for_model(model), tok, num_rows=rows, max_len=max_len, max_queue=max_queue)
    return ServerThread(create_app(runner, tok, model_name="gemma-test", api_keys=keys,
                                   max_prompt_tokens=max_prompt_tokens))


@pytest.fixture(scope="module")
def server(served):
    s = make_server(served)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, content=raw if raw is not None else json.dumps(body),
                      headers=headers, timeout=120)


# ---- content against the library -----------------------------------------------------------------------
PROMPT = "The capital of France is"


def test_completion_is_what_the_library_generates(served, client):
    model, tok = served
    expected = gemmaforge.generate(model, tok, [PROMPT], max_new_tokens=12)[0]
    r = client.completions.create(model="gemma-test", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.created > 0
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT)) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_uses_the_gemma_template_with_the_system_message(served, client):
    model, tok = served
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "What color is the sky?"}]
    expected = gemmaforge.generate(model, tok, [messages], max_new_tokens=10)[0]
    r = client.chat.completions.create(model="gemma-test", messages=messages, max_completion_tokens=10,
                                       temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant" and c.message.content == expected
    assert r.usage.prompt_tokens == len(encode_chat(tok, messages))
    assert c.finish_reason in ("stop", "length") and "<end_of_turn>" not in c.message.content


def test_streaming_gives_the_same_text_and_usage(client):
    whole = client.completions.create(model="gemma-test", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="gemma-test", prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = list(client.chat.completions.create(model="gemma-test", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=6, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].usage.completion_tokens >= 1


def test_n_samples_and_seed_reproducibility(client):
    def ask(seed):
        r = client.completions.create(model="gemma-test", prompt="Once upon a time", max_tokens=8,
                                      temperature=1.0, n=3, seed=seed)
        assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 24
        return [c.text for c in r.choices]

    first = ask(7)
    assert first == ask(7) and len(set(first)) > 1 and ask(8) != first


def test_logprobs_and_echo_are_the_models(served, client):
    """echo + logprobs (lm-eval's local-completions log-likelihood request): the prompt's token
    log-probs equal log_softmax of the model's logits; top-1 matches for the greedy check."""
    model, tok = served
    ids = tok.encode("The quick brown fox jumps")
    r = client.completions.create(model="gemma-test", prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                                  echo=True)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    expected = full[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]), expected, atol=1e-4, rtol=1e-4)
    assert r.choices[0].text.startswith("The quick brown fox jumps")
    generated = lp.token_logprobs[-1]
    assert generated == pytest.approx(float(full[-1].max()), abs=1e-4)
    assert max(lp.top_logprobs[-1].values()) == generated  # greedy: the token is the top-1
    chat = client.chat.completions.create(model="gemma-test", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and len(content[0].top_logprobs) == 2
    assert content[0].logprob == content[0].top_logprobs[0].logprob


def test_stop_strings_end_the_text_and_are_not_in_it(served, client):
    model, tok = served
    free = client.completions.create(model="gemma-test", prompt=PROMPT, max_tokens=12, temperature=0)
    text = free.choices[0].text
    stop = text[4:9]  # spans token boundaries in general
    r = client.completions.create(model="gemma-test", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gemma-test", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_greedy_output_is_the_same_alone_and_in_a_busy_batch(client):
    """Two greedy requests, alone, then among sampled ones of other lengths (more requests than
    rows, so some wait and join mid-way): the same text."""
    mine = ["The capital of France is", "def fibonacci(n):"]
    others = ["Water boils at", "My favourite food is", "In 1969, the first", "The largest planet"]

    def ask(p):
        if p in mine:
            return client.completions.create(model="gemma-test", prompt=p, max_tokens=10, temperature=0)
        return client.completions.create(model="gemma-test", prompt=p, max_tokens=24, temperature=0.8, seed=1)

    alone = [ask(p).choices[0].text for p in mine]
    with ThreadPoolExecutor(6) as pool:
        busy = [r.choices[0].text for r in pool.map(ask, [others[0], mine[0], others[1], others[2], mine[1],
                                                          others[3]])]
    assert [busy[1], busy[4]] == alone


def test_a_chats_next_turn_reuses_the_cached_prefix(served, client):
    messages = [{"role": "user", "content": "Name a fruit."}]
    first = client.chat.completions.create(model="gemma-test", messages=messages, max_tokens=8, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And a vegetable?"}]
    second = client.chat.completions.create(model="gemma-test", messages=messages, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens // 2
    model, tok = served
    assert second.choices[0].message.content == gemmaforge.generate(model, tok, [messages], max_new_tokens=8)[0]


# ---- the other routes -----------------------------------------------------------------------------------------
def test_models_tokenize_detokenize_health_metrics(served, server, client):
    _, tok = served
    assert [m.id for m in client.models.list().data] == ["gemma-test"]
    ids = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert ids["tokens"] == tok.encode("Hello world") and ids["count"] == len(ids["tokens"])
    assert post(server, "/detokenize", {"tokens": tok.encode("Hello world", add_bos=False)}).json() == \
        {"prompt": "Hello world"}
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # open: no key needed
    text = httpx.get(server.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count", "kv_cache_usage_perc"):
        assert f"gemmaforge:{name}" in text


# ---- bad input and faults -----------------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", None, b"{not json", 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, None, 404, "model"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, None, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, None, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, None, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, None, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, None, 400, "n"),
    ("/v1/completions", {"prompt": "word " * 600}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "tools": [{"type": "function"}]}, None, 400, "tools"),
    ("/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 3}, None, 400,
     "top_logprobs"),
    ("/v1/completions", [1, 2], None, 400, None),
]


@pytest.mark.parametrize("path,body,raw,status,param", BAD)
def test_bad_requests_get_a_4xx_in_openais_error_shape(server, path, body, raw, status, param):
    r = post(server, path, body, raw=raw)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_api_keys(server):
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}, key=None).status_code == 401
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(server.url + "/health").json()["running"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    body = {"prompt": "Write a long story.", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert httpx.get(server.url + "/health").json()["running"] == 1
    assert wait_idle(server, 5.0), "the row was not freed after the client left"


def test_a_full_queue_answers_503_with_retry_after(served):
    s = make_server(served, rows=1, max_queue=0)
    try:
        # ignore_eos: the row must stay busy for all 200 tokens, whatever the model says
        body = {"prompt": "Tell me a story.", "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
            next(r.iter_lines())
            busy = post(s, "/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert busy.status_code == 503 and busy.headers["retry-after"]
            assert busy.json()["error"]["code"] == "server_busy"
        assert wait_idle(s)
        assert post(s, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        s.close()


def test_pool_shape_fits_the_budget(served):
    model, _ = served
    c = model.config
    rows, length = pool_shape(c, 128, 4, dtype_bytes=4)
    cache = model.new_cache(rows, length, 16)
    assert rows == 4 and cache.nbytes() <= 128 * 2**20 < model.new_cache(rows, length + 64, 16).nbytes()
    with pytest.raises(gemmaforge.GemmaforgeError, match="kv-budget-mb"):
        pool_shape(c, 1, 8, dtype_bytes=4)


def test_serve_cli_rejects_bad_flags(embedded_gguf):
    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    for flags, message in ((["--max-batch", "0"], "max-batch"), (["--port", "0"], "port"),
                           (["--kv-budget-mb", "-1"], "kv-budget-mb")):
        with pytest.raises(gemmaforge.GemmaforgeError, match=message):
            serve_cmd.build(parser.parse_args(flags))


def test_sigterm_finishes_running_requests_and_exits_0(embedded_gguf):
    port = free_port()
    env = {**os.environ, "GEMMAFORGE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "gemmaforge", "serve", "--model", str(embedded_gguf),
                             "--port", str(port), "--max-batch", "2", "--kv-budget-mb", "64"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        body = {"prompt": "Count: one, two,", "max_tokens": 24, "temperature": 0, "stream": True}
        pieces = []
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=120) as r:
            lines = r.iter_lines()
            pieces.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            try:  # no new requests once draining: refused (socket closed) or 503
                late = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                                  headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code
            except httpx.TransportError:
                late = "refused"
            assert late in ("refused", 503)
            pieces += [line for line in lines if line]
        assert pieces[-1] == "data: [DONE]"
        finals = [json.loads(p[6:]) for p in pieces if p.startswith("data: {")]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
