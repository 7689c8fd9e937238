"""Per-row sampling (``Sampler``): each row's settings against transformers' processors row by row,
batch independence of the draws, their distribution, log-probs, and the logits-processor hook."""

import math
import random

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gemmaforge import GemmaforgeError, SamplingParams, cpu_kernel
from gemmaforge.generation import sampling
from gemmaforge.generation.sampler import Sampler
from gemmaforge.generation.sampling import (
    apply_min_p,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_k_top_p,
    apply_top_p,
    row_seed,
)

V = 500

# Six rows, every setting different per row, each processor off in some rows and on in others.
ROWS = [
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=1.4, top_p=0.5),
    SamplingParams(temperature=0.0, repetition_penalty=1.5, top_k=3),  # greedy: only the penalty applies
    SamplingParams(temperature=0.9, top_k=1000, min_p=0.1, repetition_penalty=0.8),
    SamplingParams(temperature=1.2, top_k=5, frequency_penalty=0.5, presence_penalty=-0.3),
]


def rand_logits(rows, seed=0, scale=3.0, v=V):
    return torch.randn(rows, v, generator=torch.Generator().manual_seed(seed)) * scale


def rand_ids(n, seed, v=V):
    return torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_chain(p: SamplingParams) -> LogitsProcessorList:
    """What HF generate would run for these params (GenerationMixin._get_logits_processor order)."""
    procs = []
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if not p.greedy:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
        if p.min_p:
            procs.append(MinPLogitsWarper(p.min_p))
    return LogitsProcessorList(procs)


def openai_penalties(logits, generated, p: SamplingParams):
    """logit -= frequency * count + presence * (count > 0) over the generated tokens (vLLM's order)."""
    counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[-1])
    return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def filled(slots_and_params, num_slots=8, v=V, prompt_len=12):
    s = Sampler(num_slots, v)
    prompts = {}
    for i, (slot, params) in enumerate(slots_and_params):
        prompts[slot] = rand_ids(prompt_len + i, seed=100 + i, v=v)
        s.set_row(slot, params, prompts[slot], seed=1000 + i)
    return s, prompts


# ---- each processor, per row, against HF -----------------------------------------------------------
def test_each_row_matches_hf_with_its_own_settings():
    slots = [5, 0, 3, 7, 1, 2]
    sampler, prompts = filled(list(zip(slots, ROWS)))
    generated = {s: [] for s in slots}
    for step in range(6):  # a few steps, so the penalties also see generated tokens
        logits = rand_logits(len(slots), seed=step)
        ours = sampler.process(logits, slots)
        for i, (slot, p) in enumerate(zip(slots, ROWS)):
            ids = torch.tensor([prompts[slot] + generated[slot]])
            row = logits[i:i + 1]
            if p.frequency_penalty or p.presence_penalty:  # not in HF: the OpenAI formula, then HF's chain
                row = openai_penalties(row, generated[slot], p)
            theirs = hf_chain(p)(ids, row.clone())
            assert torch.equal(ours[i:i + 1], theirs), (step, i, p)
        out = sampler.sample(logits, slots)
        for slot, t in zip(slots, out.tokens.tolist()):
            generated[slot].append(t)


@pytest.mark.parametrize("ks", [[0, 1, 5, 50, 10_000]])
def test_apply_top_k_per_row(ks):
    logits = rand_logits(len(ks), seed=1)
    ours = apply_top_k(logits, torch.tensor(ks))
    for i, k in enumerate(ks):
        theirs = logits[i:i + 1] if k == 0 else TopKLogitsWarper(k)(None, logits[i:i + 1].clone())
        assert torch.equal(ours[i:i + 1], theirs)


def test_apply_top_p_per_row():
    ps = [1.0, 0.05, 0.5, 0.9, 0.999]
    logits = rand_logits(len(ps), seed=2)
    ours = apply_top_p(logits, torch.tensor(ps, dtype=torch.float64))
    for i, p in enumerate(ps):
        theirs = logits[i:i + 1] if p == 1 else TopPLogitsWarper(p)(None, logits[i:i + 1].clone())
        assert torch.equal(ours[i:i + 1], theirs)
    assert torch.equal(ours[0], logits[0])


def test_top_p_off_keeps_tokens_whose_probability_underflows():
    """top_p=1 must be a no-op even where softmax gives exactly 0 (HF skips the warper at 1)."""
    logits = torch.tensor([[0.0, -200.0, -300.0, 5.0], [0.0, -200.0, -300.0, 5.0]])
    ours = apply_top_p(logits, torch.tensor([1.0, 0.5]))
    assert torch.equal(ours[0], logits[0])
    assert torch.isinf(ours[1]).sum() == 3


def test_apply_min_p_per_row():
    mins = [0.0, 0.01, 0.1, 0.5]
    logits = rand_logits(len(mins), seed=3)
    ours = apply_min_p(logits, torch.tensor(mins))
    for i, m in enumerate(mins):
        theirs = logits[i:i + 1] if m == 0 else MinPLogitsWarper(m)(None, logits[i:i + 1].clone())
        assert torch.equal(ours[i:i + 1], theirs)


def test_apply_top_k_then_top_p_per_row_with_one_sort():
    ks, ps = [0, 10, 200, 3], [0.8, 1.0, 0.6, 0.95]
    logits = rand_logits(4, seed=4)
    ours = apply_top_k_top_p(logits, torch.tensor(ks), torch.tensor(ps, dtype=torch.float64))
    for i, (k, p) in enumerate(zip(ks, ps)):
        chain = ([TopKLogitsWarper(k)] if k else []) + ([TopPLogitsWarper(p)] if p < 1 else [])
        assert torch.equal(ours[i:i + 1], LogitsProcessorList(chain)(None, logits[i:i + 1].clone()))


def test_apply_repetition_penalty_per_row():
    penalties = [1.0, 1.3, 0.7, 2.0]
    logits = rand_logits(4, seed=5)
    ids = torch.randint(0, V, (4, 30), generator=torch.Generator().manual_seed(5))
    seen = torch.zeros(4, V, dtype=torch.bool)
    seen[torch.arange(4)[:, None], ids] = True
    ours = apply_repetition_penalty(logits, seen, torch.tensor(penalties))
    for i, pen in enumerate(penalties):
        theirs = RepetitionPenaltyLogitsProcessor(pen)(ids[i:i + 1], logits[i:i + 1].clone())
        assert torch.equal(ours[i:i + 1], theirs)
    assert torch.equal(ours[0], logits[0])


def test_presence_frequency_penalty_is_openais_formula():
    logits = rand_logits(3, seed=6)
    counts = torch.zeros(3, V, dtype=torch.int32)
    counts[:, 7], counts[:, 9], counts[1, 11] = 3, 1, 2
    presence, frequency = torch.tensor([0.0, 0.5, -1.0]), torch.tensor([0.0, 0.2, 0.1])
    ours = apply_presence_frequency_penalty(logits, counts, presence, frequency)
    assert torch.equal(ours[0], logits[0])
    assert ours[1, 7] == pytest.approx(float(logits[1, 7]) - 0.2 * 3 - 0.5)
    assert ours[1, 11] == pytest.approx(float(logits[1, 11]) - 0.2 * 2 - 0.5)
    assert ours[2, 9] == pytest.approx(float(logits[2, 9]) - 0.1 + 1.0)
    untouched = counts == 0
    assert torch.equal(ours[untouched], logits[untouched])


def test_presence_and_frequency_count_generated_tokens_not_the_prompt():
    s = Sampler(1, 10)
    s.set_row(0, SamplingParams(frequency_penalty=1.0, presence_penalty=0.5), [4, 4, 4], seed=0)
    logits = torch.zeros(1, 10)
    logits[0, 4] = 1.0
    assert torch.equal(s.process(logits, [0]), logits)  # the prompt's 4s are not counted
    assert s.sample(logits, [0]).tokens.item() == 4
    assert s.process(logits, [0])[0, 4] == pytest.approx(1.0 - 1.0 - 0.5)


# ---- randomness that belongs to the row --------------------------------------------------------------
TARGET = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.2,
                        frequency_penalty=0.3)
OTHERS = [SamplingParams(), SamplingParams(temperature=1.5, top_k=2), SamplingParams(temperature=0.5, top_p=0.3),
          SamplingParams(temperature=1.0, repetition_penalty=2.0, presence_penalty=1.0),
          SamplingParams(temperature=2.0)]


def step_logits(row_id: int, step: int) -> torch.Tensor:
    """The model's logits for one row at one step (a fixed function, as a real model's would be)."""
    return torch.randn(V, generator=torch.Generator().manual_seed(row_id * 10_000 + step)) * 2.0


def run_target(slot: int, num_slots: int, others: list[int], seed: int = 42, steps: int = 25, order_seed=None,
               as_tensor=False, host_view=True, monkeypatch=None):
    s = Sampler(num_slots, V)
    prompt = rand_ids(9, seed=7)
    s.set_row(slot, TARGET, prompt, seed=seed)
    shuffle = random.Random(order_seed)
    live = {}
    for j, o in enumerate(others):
        s.set_row(o, OTHERS[j % len(OTHERS)], rand_ids(5 + j, seed=j), seed=j)
        live[o] = j
    if not host_view:
        # What a GPU sampler does with slots it cannot read: decide by the whole pool.
        monkeypatch.setattr(s, "_host_view", lambda slots: None)
    out = []
    for step in range(steps):
        rows = [slot] + list(live)
        if order_seed is not None:
            shuffle.shuffle(rows)
            if step == 10 and live:  # a neighbour leaves and a new one joins mid-way
                gone = next(iter(live))
                s.clear_row(gone)
                s.set_row(gone, OTHERS[4], [1, 2, 3], seed=99)
                live[gone] = 99
            if step % 3 == 2:  # only some of the pool this step (the rest wait, e.g. for a prefill)
                rows = [r for r in rows if r == slot or shuffle.random() < 0.5]
        logits = torch.stack([step_logits(1000 if r == slot else live[r], step) for r in rows])
        slots = torch.tensor(rows) if as_tensor else rows
        tokens = s.sample(logits, slots).tokens.tolist()
        out.append(tokens[rows.index(slot)])
    return out


def test_a_row_samples_the_same_alone_or_in_any_batch(monkeypatch):
    alone = run_target(slot=0, num_slots=1, others=[])
    assert len(set(alone)) > 5  # actually random
    assert run_target(slot=5, num_slots=8, others=[0, 1, 2, 3, 7], order_seed=1) == alone
    assert run_target(slot=2, num_slots=6, others=[5, 4, 0], order_seed=2, as_tensor=True) == alone
    assert run_target(slot=3, num_slots=4, others=[0, 1, 2], order_seed=3, host_view=False,
                      monkeypatch=monkeypatch) == alone


def test_same_seed_same_stream_different_seed_different_stream():
    a, b = run_target(0, 1, [], seed=7), run_target(0, 1, [], seed=7)
    assert a == b
    c = run_target(0, 1, [], seed=8)
    assert a != c


def test_a_slot_reused_by_the_same_request_repeats_it():
    s = Sampler(2, V)
    logits = torch.stack([step_logits(3, t) for t in range(8)])

    def run():
        s.set_row(1, TARGET, [1, 2, 3], seed=5)
        tokens = [s.sample(logits[t:t + 1], [1]).tokens.item() for t in range(8)]
        s.clear_row(1)
        return tokens

    assert run() == run()  # step, counts and history were reset by set_row


def test_draws_follow_the_filtered_distribution_across_seeds_and_across_steps():
    """4000 draws: from 4000 seeds at one step, and from one seed over 4000 steps; chi-square."""
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.8, top_k=4)
    expected = sampling.process_logits(base[None], params).softmax(-1)[0]
    n = 4000

    def chi2(tokens):
        counts = torch.bincount(tokens, minlength=6).double()
        assert counts[4:].sum() == 0  # filtered by top-k: never drawn
        e = expected[:4].double() * n
        return float(((counts[:4] - e) ** 2 / e).sum())

    many = Sampler(n, 6)
    for i in range(n):
        many.set_row(i, params, [0], seed=row_seed(123, i))
    across_seeds = many.sample(base.expand(n, 6), list(range(n))).tokens

    one = Sampler(1, 6)
    one.set_row(0, params, [0], seed=9)
    across_steps = torch.cat([one.sample(base[None], [0]).tokens for _ in range(n)])
    # 3 degrees of freedom: P(chi2 > 21) ~ 1e-4
    assert chi2(across_seeds) < 21
    assert chi2(across_steps) < 21


def test_the_hash_is_splitmix64_in_int64():
    values = [random.Random(0).getrandbits(64) for _ in range(1)] + [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
    rng = random.Random(1)
    values += [rng.getrandbits(64) for _ in range(2000)]
    t = torch.tensor([sampling._signed(v) for v in values])
    got = [x % 2**64 for x in sampling._mix64(t).tolist()]
    assert got == [sampling._mix64_int(v) for v in values]


def test_row_seed_rule_for_n_samples():
    assert row_seed(5) == row_seed(5, 0) == 5
    seeds = [row_seed(5, i) for i in range(100)]
    assert len(set(seeds)) == 100 and all(0 <= x < 2**63 for x in seeds)
    assert row_seed(5, 1) == row_seed(5, 1) != 6  # not seed + i: (5, n=2) does not repeat seed 6
    assert row_seed(None) != row_seed(None) and 0 <= row_seed(None, 3) < 2**63


# ---- greedy --------------------------------------------------------------------------------------------
def test_greedy_fast_path_is_one_argmax():
    s = Sampler(4, V)
    for i in range(4):
        s.set_row(i, SamplingParams(temperature=0.0, top_k=5, top_p=0.5), rand_ids(4, i), seed=i)
    logits = rand_logits(4, seed=8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = s.sample(logits, [2, 0, 3, 1])
    ops = {e.key for e in prof.key_averages()}
    assert torch.equal(out.tokens, logits.argmax(-1))
    assert ("aten::argmax" in ops) != cpu_kernel.available()  # torch's, or decode_step.c's gf_argmax
    for slow in ("aten::sort", "aten::_softmax", "aten::logsumexp", "aten::topk", "aten::log1p"):
        assert slow not in ops
    assert out.logprob is None and out.top_ids is None
    assert s._counts is None  # no penalty anywhere: no [S, V] state either


def test_greedy_rows_next_to_sampled_rows_are_argmax_after_the_penalty():
    s = Sampler(3, V)
    prompt = rand_ids(20, seed=9)
    logits = rand_logits(3, seed=9)
    prompt[0] = int(logits[1].argmax())  # the greedy row has already seen its favourite token
    s.set_row(0, SamplingParams(temperature=1.3, top_k=10), [1], seed=1)
    s.set_row(1, SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt, seed=2)
    s.set_row(2, SamplingParams(temperature=0.0), [1], seed=3)
    out = s.sample(logits, [0, 1, 2])
    expected = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([prompt]), logits[1:2].clone()).argmax(-1)
    assert out.tokens[1] == expected[0] != logits[1].argmax()
    assert out.tokens[2] == logits[2].argmax()


# ---- log-probs -----------------------------------------------------------------------------------------
def test_logprobs_are_of_the_raw_logits_and_top_k_is_the_largest():
    slots = [4, 1, 0, 2]
    rows = [SamplingParams(temperature=1.5, top_k=3, logprobs=5),
            SamplingParams(temperature=0.0, repetition_penalty=1.5),
            SamplingParams(temperature=0.8, logprobs=2), SamplingParams(temperature=1.0, frequency_penalty=1.0)]
    s, _ = filled(list(zip(slots, rows)), num_slots=5)
    logits = rand_logits(4, seed=10)
    out = s.sample(logits, slots)
    raw = logits.log_softmax(-1)
    torch.testing.assert_close(out.logprob, raw.gather(1, out.tokens[:, None])[:, 0])
    assert out.top_ids.shape == out.top_logprobs.shape == (4, 5)  # k = the largest request
    top = raw.topk(5, dim=-1)
    assert torch.equal(out.top_ids, top.indices)
    torch.testing.assert_close(out.top_logprobs, top.values)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_sampled_logprob_on_request_without_top_logprobs():
    s = Sampler(2, V)
    s.set_row(0, SamplingParams(), [1], seed=0)
    s.set_row(1, SamplingParams(temperature=1.0), [1], seed=0)
    logits = rand_logits(2, seed=11)
    assert s.sample(logits, [0, 1]).logprob is None
    out = s.sample(logits, [0, 1], logprob=True)
    torch.testing.assert_close(out.logprob, logits.log_softmax(-1).gather(1, out.tokens[:, None])[:, 0])
    assert out.top_ids is None and out.top_logprobs is None


# ---- the logits-processor hook ------------------------------------------------------------------------
def test_processor_sees_slots_steps_and_history_and_can_change_the_outcome():
    s = Sampler(6, V, history=4)
    s.set_row(4, SamplingParams(temperature=0.0), [10, 11, 12, 13, 14, 15], seed=0)
    s.set_row(1, SamplingParams(temperature=1.0, top_k=50), [20, 21], seed=1)
    calls = []

    def force_7_in_slot_1(logits, slots, steps):
        calls.append((slots.tolist(), steps.tolist(), s.recent(slots, 3).tolist()))
        forced = torch.full_like(logits, -math.inf)
        forced[:, 7] = 0.0
        return torch.where((slots == 1)[:, None], forced, logits)

    logits = rand_logits(2, seed=12)
    free = s.process(logits, [4, 1])
    s.processors.append(force_7_in_slot_1)
    first = s.sample(logits, [4, 1])
    second = s.sample(logits.flip(0), [1, 4])  # the same rows, the other order
    assert first.tokens[1] == 7 and second.tokens[0] == 7
    assert first.tokens[0] == second.tokens[1] == free[0].argmax()  # the greedy row kept its own outcome
    g = int(free[0].argmax())
    assert calls[0] == ([4, 1], [0, 0], [[13, 14, 15], [-1, 20, 21]])
    assert calls[1] == ([1, 4], [1, 1], [[20, 21, 7], [14, 15, g]])
    assert s.recent([4], 4).tolist() == [[14, 15, g, g]]
    assert s.steps([4, 1]).tolist() == [2, 2]


def test_processor_cannot_reach_the_callers_logits():
    s = Sampler(1, V)
    s.set_row(0, SamplingParams(), [1], seed=0)

    def in_place(logits, slots, steps):
        logits[:, 0] = 1e9
        return logits

    s.processors.append(in_place)
    logits = rand_logits(1, seed=13)
    before = logits.clone()
    out = s.sample(logits, [0], logprob=True)
    assert out.tokens.item() == 0 and torch.equal(logits, before)


def test_processor_must_return_logits_of_the_same_shape():
    s = Sampler(1, V)
    s.set_row(0, SamplingParams(), [1], seed=0)
    s.processors.append(lambda logits, slots, steps: logits[:, :10])
    with pytest.raises(GemmaforgeError, match="must return a tensor of shape"):
        s.sample(rand_logits(1), [0])


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,fragment", [
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("frequency_penalty", math.inf, "[-2, 2]"),
    ("logprobs", 21, "[0, 20]"),
    ("logprobs", 1.0, "integer"),
    ("stop_token_ids", (-1,), "stop_token_ids"),
    ("stop_token_ids", ("x",), "stop_token_ids"),
])
def test_new_params_are_checked(field, value, fragment):
    with pytest.raises(GemmaforgeError, match=field) as e:
        SamplingParams(**{field: value})
    assert fragment in str(e.value)


def test_stop_token_ids_become_a_tuple():
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)
    assert SamplingParams(stop_token_ids=3).stop_token_ids == (3,)


@pytest.mark.parametrize("action,fragment", [
    (lambda s: s.set_row(2, SamplingParams(), [1], seed=0), "in use"),
    (lambda s: s.set_row(9, SamplingParams(), [1], seed=0), "invalid slot 9"),
    (lambda s: s.set_row(0, SamplingParams(), [V], seed=0), "outside"),
    (lambda s: s.set_row(0, SamplingParams(), [1], seed=-1), "seed=-1"),
    (lambda s: s.set_row(0, SamplingParams(stop_token_ids=(V,)), [1], seed=0), "stop_token_ids"),
    (lambda s: s.sample(rand_logits(1), [0]), "slot 0 is empty"),
    (lambda s: s.sample(rand_logits(2), [2, 2]), "repeat"),
    (lambda s: s.sample(rand_logits(1, v=V + 1), [2]), "logits must be"),
    (lambda s: s.sample(rand_logits(2), [2]), "slots of shape"),
    (lambda s: s.recent([2], 99), "recent"),
])
def test_sampler_bad_input_is_one_clear_error(action, fragment):
    s = Sampler(3, V)
    s.set_row(2, SamplingParams(), [1], seed=0)
    with pytest.raises(GemmaforgeError) as e:
        action(s)
    assert fragment in str(e.value)


def test_n_samples_can_share_one_expanded_logits_row():
    """The scheduler samples the n forks of one prefill from logits.expand(n, V) (a stride-0 view)."""
    n = 6
    s = Sampler(n, V)
    for i in range(n):
        s.set_row(i, SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.1), [1, 2], seed=row_seed(3, i))
    row = rand_logits(1, seed=14, scale=0.5)
    s.processors.append(lambda logits, slots, steps: logits + 0.0)
    expanded = s.sample(row.expand(n, V), list(range(n))).tokens
    for i in range(n):
        s.clear_row(i)
        s.set_row(i, SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.1), [1, 2], seed=row_seed(3, i))
    assert torch.equal(s.sample(row.repeat(n, 1), list(range(n))).tokens, expanded)
    assert len(set(expanded.tolist())) > 1  # the forks' seeds differ, so their draws do
