"""The fast decode path against the eager reference (model forward with a cache), the engine with
and without it, and the benchmark scripts' code paths on tiny models (no timings asserted)."""

import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, randomize
from gemmaforge import Gemma
from gemmaforge.generation.engine import Engine
from gemmaforge.generation.fast import FastForward, decode_step
from gemmaforge.generation.sampling import SamplingParams
from gemmaforge.quant import quantize

ROOT = Path(__file__).resolve().parents[1]


def padded_prompt(vocab, b=2, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    positions = torch.arange(t).expand(b, t).clone()
    positions[1, :2] = -1  # row 1 is left-padded
    return tokens, positions, g


def compare_decode(model, fast: FastForward, steps=14, max_len=40, cache_tol: float | None = None):
    """Max |logit difference| between eager (model forward) and ``fast``, prefill then ``steps`` tokens.
    14 steps after a 5-token prompt run past the tiny presets' windows, so the ring buffer wraps."""
    vocab = model.config.vocab_size
    tokens, positions, g = padded_prompt(vocab)
    ref_cache, fast_cache = model.new_cache(2, max_len), fast.new_cache(2, max_len)
    with torch.no_grad():
        err = (model(tokens, positions, ref_cache)[:, -1] - fast(tokens, positions, fast_cache)).abs().max()
        pos = positions[:, -1:]
        for _ in range(steps):
            new = torch.randint(0, vocab, (2, 1), generator=g)
            pos = pos + 1
            ref = model(new, pos, ref_cache)[:, -1]
            err = max(err, (ref - fast(new, pos, fast_cache)).abs().max())
    assert fast_cache.length == ref_cache.length
    # The same keys were written to the same slots. Row 0 only: row 1's padding slots hold garbage
    # (a pad query sees no key) that differs with whatever a reused cache held before, harmlessly.
    for a, b in zip(ref_cache.k, fast_cache.k):
        n = min(ref_cache.length, a.shape[2])  # a compiled CPU cache has one spare slot (kv_cache.py)
        torch.testing.assert_close(a[0, :, :n], b[0, :, :n], atol=cache_tol, rtol=cache_tol)
    return float(err)


def test_fast_decode_matches_eager(model):
    assert model.config.sliding_window < 19
    assert compare_decode(model, FastForward(model)) < 1e-5


def test_static_shape_step_matches_eager(model):
    """kv_lens=None is the GPU form (attend over every global slot, unwritten ones masked)."""
    fast = FastForward(model)
    tokens, positions, g = padded_prompt(model.config.vocab_size)
    a, b = model.new_cache(2, 32), model.new_cache(2, 32)
    with torch.no_grad():
        model(tokens, positions, a)
        fast(tokens, positions, b)
        pos = positions[:, -1:]
        for _ in range(10):
            new = torch.randint(0, model.config.vocab_size, (2, 1), generator=g)
            pos = pos + 1
            ref = model(new, pos, a)[:, -1]
            out = decode_step(model, new, pos, b, kv_lens=None)
            b.advance(pos[:, 0].tolist())
            assert (ref - out).abs().max() < 1e-5


def test_soft_caps_are_applied_in_the_fast_step():
    """Tiny caps (1 and 2) make every tanh matter: the step must still match eager, stay inside the
    final cap, and differ from the same weights without caps (no silently uncapped kernel)."""
    capped_cfg = CONFIGS["gemma2"].replace(attn_logit_softcap=1.0, final_logit_softcap=2.0)
    capped = randomize(Gemma(capped_cfg))
    with torch.no_grad():
        capped.embed.weight.mul_(20)  # logits well beyond the final cap
    uncapped = Gemma(capped_cfg.replace(attn_logit_softcap=None, final_logit_softcap=None))
    uncapped.load_state_dict(capped.state_dict())
    assert compare_decode(capped, FastForward(capped)) < 1e-5
    tokens, positions, _ = padded_prompt(capped_cfg.vocab_size)
    fa, fb = FastForward(capped), FastForward(uncapped.eval())
    ca, cb = capped.new_cache(2, 16), uncapped.new_cache(2, 16)
    fa(tokens, positions, ca), fb(tokens, positions, cb)
    new, pos = tokens[:, :1], positions[:, -1:] + 1
    a, b = fa(new, pos, ca), fb(new, pos, cb)
    assert a.abs().max() <= 2.0 and b.abs().max() > 2.0
    assert (torch.tanh(b / 2) * 2 - a).abs().max() > 1e-3  # the attention cap changed the hidden states too


@pytest.mark.parametrize("compile", [False, None], ids=["eager", "default"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fast_decode_matches_eager_on_a_quantized_model(mode, compile):
    """compile=None is the default, which compiles the whole step for a quantized model on CPU.

    float32 activations: every kernel (GEMV, sgemm, the compiled reduction) computes the same float32
    products in another order, so logits agree to float32 rounding, ~1e-6 relative (tolerance 1e-5)."""
    model = quantize(randomize(Gemma(CONFIGS["gemma3"])), mode, activations="float32")
    fast = FastForward(model, compile=compile)
    assert fast.compile == (compile is None) and not fast.graphs
    assert compare_decode(model, fast, cache_tol=1e-5) < 1e-5
    assert fast.compile == (compile is None)  # it compiled; no silent fallback to eager


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_bf16_activation_step_matches_eager(mode):
    """bfloat16 activations: both paths round the same tensors to bf16 at the same points, but a
    float32-level difference upstream (inductor fuses the norms in another order) can move a value
    across a bf16 rounding boundary: one bf16 ulp, 2^-8 relative, which moves a logit of the tiny
    model (|logit| < 4) by up to ~1e-2. Each kernel's bf16 arithmetic is checked exactly in test_quant.py."""
    model = quantize(randomize(Gemma(CONFIGS["gemma3"])), mode, activations="bfloat16")
    fast = FastForward(model)
    assert fast.compile
    assert compare_decode(model, fast, cache_tol=3e-2) < 3e-2


def test_compiled_cpu_step_serves_every_cache_length_with_one_graph():
    """Lengths are symbolic: a chat's next turn (another cache length) and a context that outgrows
    the window must not recompile (~30 s on 2 cores), and must still generate what eager generates."""
    model = quantize(randomize(Gemma(CONFIGS["gemma2"])), "int8")
    window = model.config.sliding_window
    engine, eager = Engine(model), Engine(model, fast=False)
    short = [[2, 7]]  # compiled while the context is shorter than the window (ring not full)
    long = [[2, *range(3, 3 + window)]]  # starts past the window, ends past twice the window
    params = SamplingParams(temperature=0.0, max_new_tokens=window + 2)
    assert engine.generate(short, SamplingParams(temperature=0.0, max_new_tokens=2)) == \
        eager.generate(short, SamplingParams(temperature=0.0, max_new_tokens=2))
    with torch.compiler.set_stance("fail_on_recompile"):
        out = engine.generate(long, params)
    assert out == eager.generate(long, params)


def test_without_a_cpp_compiler_the_step_runs_eagerly(monkeypatch):
    """No C++ compiler: warn once at construction and decode eagerly (checked up front; a compile
    error with a compiler present is a bug and is raised, not swallowed)."""
    fast_module = importlib.import_module("gemmaforge.generation.fast")

    model = quantize(randomize(Gemma(CONFIGS["gemma2"])), "int8")
    monkeypatch.setattr(fast_module, "can_compile_cpu", lambda: False)
    with pytest.warns(UserWarning, match="runs eagerly"):
        fast = FastForward(model)
    assert not fast.compile and fast._step is decode_step
    assert compare_decode(model, fast, steps=3) < 1e-5


def test_cache_overflow_is_an_error(model):
    fast = FastForward(model)
    cache = model.new_cache(1, 3)
    fast(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)
    with pytest.raises(ValueError, match="cache full"):
        fast(torch.tensor([[4]]), torch.tensor([[3]]), cache)


def test_compiled_step_matches_eager():
    """The torch.compile'd step (fullgraph: no graph breaks) on CPU; the GPU run adds CUDA graphs."""
    model = randomize(Gemma(CONFIGS["gemma2"]))
    fast = FastForward(model, compile=True, mode="default")
    assert compare_decode(model, fast, steps=10) < 1e-5
    assert compare_decode(model, fast, steps=4) < 1e-5  # a reused (pooled) cache: no stale state


def test_compiled_cpu_step_is_private_to_its_model_and_reads_weights_updated_in_place():
    """The compiled CPU step carries no guards on the model (fast._compile_options). So (a) two
    models with the same cache shapes but different modules (float32 and int8 linears) must each
    get their own compiled step (reusing the first one's fails on the second model's missing
    parameters), and (b) an in-place weight update (an optimizer step between RL rollouts) must be
    seen by the already compiled step."""
    g2 = randomize(Gemma(CONFIGS["gemma2"]))
    g3 = quantize(copy.deepcopy(g2), "int8")
    fast2 = FastForward(g2, compile=True)
    assert compare_decode(g2, fast2, steps=3) < 1e-5
    fast3 = FastForward(g3, compile=True)
    assert compare_decode(g3, fast3, steps=3) < 1e-5
    with torch.no_grad():
        g2.final_norm.weight.mul_(-1.5)  # changes every logit
        g2.layers[0].attn.q_proj.weight.mul_(0.5)
    assert compare_decode(g2, fast2, steps=3) < 1e-5


def test_compiled_step_decodes_only_the_live_rows_of_a_pool():
    """A server's pool has more rows than requests: the scheduler decodes rows 0..last live one
    (KVCache.prefix views) through the compiled step, a narrower batch as rows free up, and each
    request still generates what it generates alone (eager greedy)."""
    from gemmaforge.generation.scheduler import Request

    model = quantize(randomize(Gemma(CONFIGS["gemma2"])), "int8")
    engine, eager = Engine(model), Engine(model, fast=False)
    widths = []
    step = engine.fast._step
    engine.fast._step = lambda m, tokens, *a: widths.append(tokens.shape[0]) or step(m, tokens, *a)
    sched = engine.scheduler(4, 48)
    prompts, budgets = [[2, 7, 9], [2, 5], [2, 11, 4, 6]], [9, 3, 6]
    seqs = [sched.submit(Request(p, SamplingParams(max_new_tokens=b)))[0] for p, b in zip(prompts, budgets)]
    while sched.has_work():
        sched.step()
    assert [s.tokens for s in seqs] == [eager.generate([p], SamplingParams(max_new_tokens=b))[0]
                                        for p, b in zip(prompts, budgets)]
    assert max(widths) == 3 and widths[-1] == 1 and 4 not in widths  # row 3 never joined a step


def test_compiled_step_does_not_recompile_when_the_batch_fills_the_pool():
    """One live row, then two, then the whole pool (a server filling up): batch 1 and one dynamic
    batch size, no third compilation when the step covers the pool itself rather than a prefix
    view of it (dynamo guards on the views and the pool being marked alike)."""
    from torch._dynamo.utils import counters

    from gemmaforge.generation.scheduler import Request

    model = quantize(randomize(Gemma(CONFIGS["gemma2"])), "int8")
    engine = Engine(model)
    sched = engine.scheduler(3, 48)
    for n in (1, 2, 3):
        if n == 3:
            before = counters["stats"]["unique_graphs"]
        seqs = [sched.submit(Request([2, 7 + i, 9], SamplingParams(max_new_tokens=3)))[0] for i in range(n)]
        while sched.has_work():
            sched.step()
        assert all(len(s.tokens) == 3 for s in seqs)
    assert counters["stats"]["unique_graphs"] == before  # the whole pool compiled nothing new


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_engine_fast_is_default_and_generates_what_eager_generates(name):
    model = randomize(Gemma(CONFIGS[name]))
    prompts = [[2, 7, 9, 11], [2, 5]]
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    fast_engine, eager_engine = Engine(model), Engine(model, fast=False)
    assert fast_engine.fast is not None and eager_engine.fast is None
    assert fast_engine.generate(prompts, params) == eager_engine.generate(prompts, params)
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=3, max_new_tokens=12)
    assert fast_engine.generate(prompts, sampled) == eager_engine.generate(prompts, sampled)


# ---- the benchmark code paths on tiny models (speed is measured by the scripts, never asserted) ------
def test_benchmark_rounds_keep_the_best_and_every_round():
    """--rounds: best speed per variant over the rounds, a failed round left out, every round kept,
    and the file-as-stored pair's ratio round by round (each round measures both close in time)."""
    from gemmaforge.benchmark_report import best_of_rounds
    from gemmaforge.benchmark_report import format_table

    def run(variant, prefill, b1, b4, ttft, load, rss):
        return {"variant": variant, "weights": "w", "prefill_tok_s": prefill, "decode_tok_s_b1": b1,
                "decode_tok_s_b4": b4, "ttft_ms": ttft, "load_s": load, "peak_rss_mb": rss}

    ours = best_of_rounds([run("gemmaforge:gguf", 100.0, 50.0, 90.0, 30.0, 0.5, 900),
                           run("gemmaforge:gguf", 120.0, 45.0, 95.0, 25.0, 0.7, 950),
                           {"variant": "gemmaforge:gguf", "skipped": "failed (exit -11)"}])
    assert (ours["prefill_tok_s"], ours["decode_tok_s_b1"], ours["decode_tok_s_b4"]) == (120.0, 50.0, 95.0)
    assert (ours["ttft_ms"], ours["load_s"], ours["peak_rss_mb"]) == (25.0, 0.5, 950)
    assert ours["per_round"]["decode_tok_s_b1"] == [50.0, 45.0] and ours["rounds_failed"] == 1
    assert best_of_rounds([{"variant": "x", "skipped": "why"}]) == {"variant": "x", "skipped": "why"}
    assert "per_round" not in best_of_rounds([run("x", 1.0, 1.0, 1.0, 1.0, 1.0, 1)])
    peer = best_of_rounds([run("llama.cpp:source", 80.0, 40.0, None, 40.0, 0.4, 2700),
                           run("llama.cpp:source", 60.0, 50.0, None, 41.0, 0.4, 2700)])
    report = {"settings": {"batch": 4, "threads": 2, "rounds": 3}, "environment": {"cpu": "X"},
              "results": [ours, peer]}
    table = format_table(report)
    assert "| llama.cpp:source | 80.0, 60.0 | 40.0, 50.0 | n/a, n/a |" in table
    assert "decode b1, round by round: 1.25x, 0.90x" in table and "prefill, round by round: 1.25x, 2.00x" in table


def test_benchmark_runs_and_writes_a_report(tmp_path):
    from gemmaforge.benchmark import BenchSettings, run_benchmark, write_json
    from gemmaforge.benchmark_report import format_table

    s = BenchSettings(prompt_len=12, new_tokens=3, batch=2, repeats=1, isolate=False,
                      variants=("gemmaforge:fp32", "gemmaforge:int8-h4", "gemmaforge-eager:fp32", "hf:fp32",
                                "llama.cpp:q8_0"))
    report = run_benchmark("tiny-gemma2", s, tmp_path / "work", progress=False)
    rows = {r["variant"]: r for r in report["results"]}
    for v in ("gemmaforge:fp32", "gemmaforge:int8-h4", "hf:fp32"):
        assert rows[v]["prefill_tok_s"] > 0 and rows[v]["decode_tok_s_b1"] > 0 and rows[v]["decode_tok_s_b2"] > 0
    assert "skipped" in rows["llama.cpp:q8_0"] or rows["llama.cpp:q8_0"]["decode_tok_s_b1"] > 0
    table = format_table(report)
    assert table.count("\n") == len(s.variants) + 3 and "1.00x" in table  # HF row divided by itself
    assert table.startswith("CPU: ")  # every results table names its machine
    write_json(report, tmp_path / "out" / "r.json")
    assert json.loads((tmp_path / "out" / "r.json").read_text())["settings"]["batch"] == 2
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_benchmark_perplexity_agrees_with_transformers():
    """Teacher-forced perplexity, ours vs HF's on the same weights: the number reported per precision."""
    pytest.importorskip("transformers")
    from test_model_hf import hf_model

    from gemmaforge.benchmark import gemmaforge_perplexity, hf_perplexity

    model = randomize(Gemma(CONFIGS["gemma3"]))
    ids = [2] + torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    ours, theirs = gemmaforge_perplexity(model, ids, chunk=7), hf_perplexity(hf_model(model), ids)
    assert abs(ours / theirs - 1) < 1e-4


def test_bench_command_rejects_bad_input():
    from gemmaforge.cli import main

    assert main(["bench", "--variants", "gemmaforge:int3"]) == 2
    assert main(["bench", "--new-tokens", "1"]) == 2


def test_gpu_script_runs_on_cpu_with_a_tiny_preset(tmp_path):
    """bench/gpu_inference.py is written for one H100; its whole path (build, correctness against
    eager, every timed variant, JSON) runs here on CPU with a tiny preset."""
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_inference.py"), "--device", "cpu", "--preset", "tiny-gemma2",
         "--prefill-lens", "16,32", "--long-prefill", "64", "--batches", "1,2", "--prompt-len", "8",
         "--new-tokens", "4", "--repeats", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_inference.json").read_text())
    checks = report["correctness"]
    assert checks and all(c["ok"] for c in checks), checks
    names = " | ".join(c["name"] for c in checks)
    for part in ("decode fast vs eager", "chunked vs eager (local", "chunked vs eager (global", "sdpa refuses",
                 "vs HF transformers"):
        assert part in names
    assert report["prefill"] and report["decode"]
    assert report["long_prefill"]["peak_bytes"] is None or report["long_prefill"]["peak_bytes"] > 0
