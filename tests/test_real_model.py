"""The embedded Gemma 3 270M (Q4_K_M GGUF) against transformers on the same file, in float32.

transformers dequantizes the GGUF itself (gguf.quants) and runs its own Gemma 3, so agreement checks
our loader, network, cache and engine end to end. Building the HF model takes a while: once per module.
Run with ``-s`` to see the measured numbers.
"""

import subprocess
import sys
import threading
import time

import pytest
import torch

import gemmaforge
from gemmaforge import SamplingParams
from gemmaforge.generation import Engine

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "Water boils at",
]
PARAGRAPH = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The majority of the forest, "
    "60%, is in Brazil, followed by Peru with 13% and Colombia with 10%. It represents over half of the "
    "planet's remaining rainforests and comprises the largest and most biodiverse tract of tropical forest."
)
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def path(embedded_gguf):
    return embedded_gguf


@pytest.fixture(scope="module")
def cli_run(path):
    """Start the CLI smoke test now, so it runs while the models load; collect it in its test."""
    result = {"start": time.perf_counter()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemmaforge", "generate", "The capital of France is", "--max-new-tokens", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def wait():  # records when the command itself ended, not when its test got to look
        result["out"], result["err"] = proc.communicate()
        result["seconds"] = time.perf_counter() - result["start"]

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    yield proc, waiter, result
    if proc.poll() is None:  # its test was deselected
        proc.kill()
    waiter.join()


@pytest.fixture(scope="module")
def ours(path, cli_run):
    return gemmaforge.load(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def tok(path):
    return gemmaforge.load_tokenizer(path)


@pytest.fixture(scope="module")
def hf(path, cli_run):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    assert type(model).__module__.startswith("transformers.")  # an independent implementation
    return model.eval()


@torch.no_grad()
def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0, top_k=None, top_p=None)
    return out[0, len(ids):].tolist()


def test_greedy_continuations_equal_transformers_generate(ours, tok, hf):
    prompts = [tok.encode(p) for p in PROMPTS]
    expected = [hf_greedy(hf, ids, NEW_TOKENS) for ids in prompts]
    engine = Engine(ours)
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS)
    start = time.perf_counter()
    batched = engine.generate(prompts, greedy)  # different lengths, left-padded, one batch
    seconds = time.perf_counter() - start
    print(f"\nbatched greedy, {len(prompts)} prompts x {NEW_TOKENS} tokens: {seconds:.2f} s")
    for p, e in zip(PROMPTS, expected):
        print(f"  {p!r} -> {tok.decode(e)!r}")
    assert batched == expected


def test_teacher_forced_logprobs_agree(ours, tok, hf):
    ids = torch.tensor([tok.encode(PARAGRAPH)])
    with torch.no_grad():
        a = torch.log_softmax(ours(ids)[0, :-1].float(), -1)
        b = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
    target = ids[0, 1:, None]
    token_lp_a, token_lp_b = a.gather(1, target), b.gather(1, target)
    diff_tokens = (token_lp_a - token_lp_b).abs().max().item()
    diff_all = (a - b).abs().max().item()
    print(f"\n{ids.shape[1]} tokens: max |dlogp| of the text's tokens {diff_tokens:.2e}, over the vocab {diff_all:.2e};"
          f" mean logp {token_lp_a.mean().item():.4f} vs {token_lp_b.mean().item():.4f}")
    assert diff_tokens < 1e-3
    assert diff_all < 1e-3
    assert token_lp_a.mean() > -3.5  # a real language model on real text, not a broken one near log(1/V)=-12.5


def test_cli_generate_smoke(cli_run, ours, tok):
    proc, waiter, result = cli_run
    waiter.join(timeout=300)
    print(f"\n`gemmaforge generate` end to end: {result['seconds']:.1f} s (while the test loaded models): {result['out']!r}")
    assert proc.returncode == 0, result["err"]
    expected = gemmaforge.generate(ours, tok, "The capital of France is", max_new_tokens=8)[0]
    assert result["out"] == expected + "\n"
    assert "France" in result["out"] or "Paris" in result["out"]
