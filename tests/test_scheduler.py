"""The step scheduler and the engine around it: rows join and leave at token boundaries, per-row
sampling that ignores the rest of the batch, n samples from one prefill, log-probs, the
processor hook, multi-column logits, and one reusable engine per model."""

import pytest
import torch

from conftest import CONFIGS, randomize
from gemmaforge import Gemma, SamplingParams
from gemmaforge.generation import Engine
from gemmaforge.generation.scheduler import Request
from test_engine import prompt, reference_greedy

SAMPLED = SamplingParams(temperature=1.0, top_k=40, seed=11, max_new_tokens=9)


@pytest.fixture
def tiny():
    return randomize(Gemma(CONFIGS["gemma2"]))


def run(sched, requests):
    seqs = [sched.submit(r) for r in requests]
    while sched.has_work():
        sched.step()
    return [[s.tokens for s in group] for group in seqs]


def test_rows_join_and_leave_at_token_boundaries(tiny):
    """Three requests on a pool of two rows: the third waits for a row, prefills while the other row
    keeps decoding, and every request generates what it generates alone (greedy oracle)."""
    v = tiny.config.vocab_size
    prompts = [prompt(n, v, seed=n) for n in (6, 11, 3)]
    budgets = [3, 10, 7]
    engine = Engine(tiny, prefill_chunk=4)
    sched = engine.scheduler(2, 32)
    seqs = [sched.submit(Request(p, SamplingParams(max_new_tokens=b))) for p, b in zip(prompts, budgets)]
    busy = []
    while sched.has_work():
        sched.step()
        busy.append(sum(r is not None for r in sched.rows))
    assert max(busy) == 2 and seqs[2][0].finish_reason == "length"
    for (s,), p, b in zip(seqs, prompts, budgets):
        assert s.tokens == reference_greedy(tiny, p, b)


def test_a_sampled_row_ignores_the_rest_of_the_batch(tiny):
    """Per-row randomness depends only on (seed, step): the same request alone, or next to other
    requests (other rows, other order, joining mid-way), samples the same tokens."""
    v = tiny.config.vocab_size
    mine = Request(prompt(7, v, 1), SAMPLED)
    others = [Request(prompt(5, v, 2), SamplingParams(temperature=0.7, top_p=0.9, seed=3, max_new_tokens=12)),
              Request(prompt(9, v, 4), SamplingParams(max_new_tokens=4))]
    engine = Engine(tiny)
    alone = run(engine.scheduler(1, 32), [mine])[0][0]
    crowded = run(engine.scheduler(3, 32), [others[0], mine, others[1]])[1][0]
    late = run(engine.scheduler(2, 32), [others[1], others[0], mine])[2][0]
    assert alone == crowded == late
    assert len(set(map(tuple, [alone, run(engine.scheduler(1, 32), [Request(mine.prompt, SamplingParams(
        temperature=1.0, top_k=40, seed=12, max_new_tokens=9))])[0][0]]))) == 2  # another seed differs


def test_n_samples_share_one_prefill(tiny):
    """n=3: one prefill forked into three rows. Sample 0 is the request with n=1; the others are
    distinct streams; greedy samples are all the greedy continuation."""
    v = tiny.config.vocab_size
    ids = prompt(10, v, 5)
    engine = Engine(tiny)
    calls = []
    engine._forward = (lambda f: lambda *a, **k: (calls.append(a[0].shape), f(*a, **k))[1])(engine._forward)
    group = run(engine.scheduler(3, 32), [Request(ids, SAMPLED, n=3)])[0]
    assert calls[0] == (1, 10) and all(c[0] == 3 for c in calls[1:])  # one prefill, then the pool
    assert group[0] == run(engine.scheduler(1, 32), [Request(ids, SAMPLED)])[0][0]
    assert len({tuple(g) for g in group}) == 3
    greedy = run(engine.scheduler(3, 32), [Request(ids, SamplingParams(max_new_tokens=6), n=3)])[0]
    assert greedy == [reference_greedy(tiny, ids, 6)] * 3


def test_logprobs_are_those_of_the_model(tiny):
    v = tiny.config.vocab_size
    ids = prompt(6, v, 6)
    params = SamplingParams(temperature=1.0, seed=1, max_new_tokens=5, logprobs=3)
    engine = Engine(tiny)
    s = engine.scheduler(1, 16)
    (seq,) = s.submit(Request(ids, params))
    while s.has_work():
        s.step()
    with torch.no_grad():
        full = torch.log_softmax(tiny(torch.tensor([ids + seq.tokens]))[0, len(ids) - 1 : -1].float(), -1)
    expected = full.gather(1, torch.tensor(seq.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=1e-5, rtol=1e-5)
    top_ids, top_lps = seq.top[2]
    assert top_ids == full[2].topk(3).indices.tolist()
    torch.testing.assert_close(torch.tensor(top_lps), full[2].topk(3).values, atol=1e-5, rtol=1e-5)


def test_a_logits_processor_plugs_in_after_the_warpers(tiny):
    """The watermark's hook: a processor that bans the greedy token changes every token, and sees
    the rows' slots and steps."""
    v = tiny.config.vocab_size
    ids = prompt(6, v, 7)
    free = reference_greedy(tiny, ids, 4)
    engine = Engine(tiny)
    sched = engine.scheduler(1, 16)
    seen = []

    def ban_best(logits, slots, steps):
        seen.append(steps.tolist())
        return logits.scatter(1, logits.argmax(-1, keepdim=True), float("-inf"))

    sched.sampler.processors.append(ban_best)
    (seq,) = sched.submit(Request(ids, SamplingParams(max_new_tokens=4)))
    while sched.has_work():
        sched.step()
    assert seen == [[0], [1], [2], [3]]
    assert seq.tokens[0] != free[0]


def test_abort_frees_the_row(tiny):
    v = tiny.config.vocab_size
    sched = Engine(tiny).scheduler(1, 32)
    (a,) = sched.submit(Request(prompt(5, v, 8), SamplingParams(max_new_tokens=20)))
    (b,) = sched.submit(Request(prompt(4, v, 9), SamplingParams(max_new_tokens=3)))
    sched.step()
    sched.step()
    sched.abort(a)
    assert a.finish_reason == "abort" and sched.rows == [None]
    while sched.has_work():
        sched.step()
    assert b.tokens == reference_greedy(tiny, b.request.prompt, 3)


@pytest.mark.parametrize("fast", [True, False])
def test_logits_of_chosen_columns_and_loglikelihood(tiny, fast):
    """A multi-column forward (draft verification, continuation scoring) returns exactly the full
    forward's logits at those columns, on the fast path too."""
    v = tiny.config.vocab_size
    ids = prompt(15, v, 10)
    engine = Engine(tiny, fast=fast, prefill_chunk=4)
    cache = engine.new_cache(1, 20)
    cols = [0, 3, 14]
    out = engine.forward(torch.tensor([ids]), torch.arange(15)[None], cache, columns=cols)
    with torch.no_grad():
        full = tiny(torch.tensor([ids]))[0]
    torch.testing.assert_close(out[0], full[cols].float(), atol=1e-5, rtol=1e-5)
    context, continuation = ids[:9], ids[9:]
    ll, greedy = engine.loglikelihood(context, continuation)
    lp = torch.log_softmax(full[8:14].float(), -1).gather(1, torch.tensor(continuation)[:, None]).sum()
    assert ll == pytest.approx(float(lp), abs=1e-4)
    assert greedy == bool((full[8:14].argmax(-1) == torch.tensor(continuation)).all())


def test_one_engine_per_model_and_the_callers_mode_is_kept(tiny):
    from gemmaforge.generation.api import _engine

    tiny.train()
    assert Engine.for_model(tiny) is Engine.for_model(tiny) is _engine(tiny)
    Engine.for_model(tiny).generate([[2, 5, 7]], SamplingParams(max_new_tokens=3))
    assert tiny.training  # the engine never flipped the caller's model to eval mode


def fed_tokens(engine):
    """Wrap engine._forward to count the tokens each call feeds."""
    fed = []
    inner = engine._forward

    def counting(tokens, positions, cache, **kw):
        fed.append(int((positions >= 0).sum()) if tokens.shape[1] == 1 else tokens.numel())
        return inner(tokens, positions, cache, **kw)

    engine._forward = counting
    return fed


@pytest.mark.parametrize("fast", [True, False])
def test_prefix_reuse_skips_the_shared_prefill_and_changes_no_token(tiny, fast):
    """A finished request leaves its keys in its row. A chat's next turn (earlier prompt + reply +
    new text) and a prompt sharing only a system prefix take that row and feed only the rest; each
    generates what it generates alone (the greedy oracle). Past the window (tiny: 8) the ring has
    wrapped: a cut further back than the slack cannot be reused and is prefilled whole."""
    v = tiny.config.vocab_size
    w = tiny.config.sliding_window
    engine = Engine(tiny, fast=fast, prefill_chunk=4)
    sched = engine.scheduler(2, 64, prefix_reuse=True, slack=4)
    fed = fed_tokens(engine)
    system = prompt(5, v, 20)
    first = system + prompt(2, v, 21)
    (a,) = run_seqs(sched, [Request(first, SamplingParams(max_new_tokens=3))])
    assert a.tokens == reference_greedy(tiny, first, 3)
    turn2 = first + a.tokens + prompt(3, v, 22)  # the next chat turn
    fed.clear()
    (b,) = run_seqs(sched, [Request(turn2, SamplingParams(max_new_tokens=4))])
    assert b.cached_tokens == len(first) + 2  # the prompt and the reply fed so far (not its last token)
    assert sum(fed) == len(turn2) - b.cached_tokens + 3  # the rest of the prompt, then 3 decode steps
    assert b.tokens == reference_greedy(tiny, turn2, 4)
    other = system + prompt(3, v, 23)  # shares only the system prefix with the row holding turn2
    assert len(turn2) + 3 > sched.cache.ring and len(turn2) + 3 - len(system) > sched.cache.slack
    (c,) = run_seqs(sched, [Request(other, SamplingParams(max_new_tokens=3))])
    assert c.cached_tokens == 0 and c.tokens == reference_greedy(tiny, other, 3)
    short = system + prompt(1, v, 24)  # the row holding `other` never wrapped: cut back to the system prompt
    assert len(other) + 2 <= sched.cache.ring == w + 4
    (d,) = run_seqs(sched, [Request(short, SamplingParams(max_new_tokens=3))])
    assert d.cached_tokens == len(system) and d.tokens == reference_greedy(tiny, short, 3)
    for row, held in enumerate(sched.resident):
        assert len(held) == sched.cache.lengths[row]


def test_prefix_reuse_takes_the_lowest_of_equal_rows(tiny):
    """Rows holding the same reusable prefix: a new request takes the lowest of them, so a single
    stream's decode step stays one row wide (it covers rows 0..the last busy one)."""
    v = tiny.config.vocab_size
    sched = Engine(tiny).scheduler(3, 64, prefix_reuse=True)
    shared = prompt(3, v, 30)  # + 1 + 2 new tokens: within the ring (window 8), so the rows can be cut back
    run_seqs(sched, [Request(shared + prompt(1, v, 31), SamplingParams(max_new_tokens=2)),
                     Request(shared + prompt(1, v, 32), SamplingParams(max_new_tokens=2))])
    assert sched.resident[0][:3] == sched.resident[1][:3] == shared
    widths = []
    forward = sched.engine.forward
    sched.engine.forward = lambda tokens, *a, **k: widths.append(tokens.shape[0]) or forward(tokens, *a, **k)
    (seq,) = sched.submit(Request(shared + prompt(1, v, 33), SamplingParams(max_new_tokens=3)))
    sched.step()
    assert seq.row == 0 and seq.cached_tokens == 3
    while sched.has_work():
        sched.step()
    assert widths and set(widths) == {1}  # every forward, prefill and decode, one row wide


def run_seqs(sched, requests):
    groups = [sched.submit(r) for r in requests]
    while sched.has_work():
        sched.step()
    return [s for g in groups for s in g]


def test_prompt_scoring_returns_the_models_log_probs(tiny):
    """max_new_tokens=0 with prompt_logprobs: each prompt token's log-prob and top-k under the model
    (what OpenAI's echo + logprobs and lm-eval's log-likelihood requests read), nothing sampled;
    chunked (the chunk is capped at 64 columns) like any prefill."""
    v = tiny.config.vocab_size
    ids = prompt(70, v, 25)
    sched = Engine(tiny).scheduler(2, 96)
    (seq,) = run_seqs(sched, [Request(ids, SamplingParams(), max_new_tokens=0, prompt_logprobs=2)])
    assert seq.tokens == [] and seq.finish_reason == "length" and len(seq.prompt_logprobs) == 69
    with torch.no_grad():
        full = torch.log_softmax(tiny(torch.tensor([ids]))[0, :-1].float(), -1)
    expected = full.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([p[0] for p in seq.prompt_logprobs]), expected, atol=1e-5, rtol=1e-5)
    assert [p[1] for p in seq.prompt_logprobs] == full.topk(2).indices.tolist()
    assert sched.rows == [None, None]
