"""Engine: cached batched decoding must reproduce plain full forwards, row by row."""

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from gemmaforge import GemmaforgeError, SamplingParams
from gemmaforge.generation import Engine
from gemmaforge.generation.engine import FINISHED

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def prompt(n, vocab, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_greedy(model, ids, n, penalty=1.0):
    """Oracle: re-run the whole sequence for every new token, take the argmax (HF's penalty if any)."""
    seq = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[:, -1].float()
        if penalty != 1.0:
            logits = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seq]), logits)
        seq.append(int(logits.argmax(-1)))
    return seq[len(ids):]


@pytest.mark.parametrize("chunk", [512, 5])
def test_greedy_equals_repeated_full_forwards(model, chunk):
    """Prompt and continuation longer than the window (ring wraps); chunk=5 splits the prefill."""
    ids = prompt(19, model.config.vocab_size, 0)
    assert len(ids) + GREEDY.max_new_tokens > 2 * model.config.sliding_window
    out = Engine(model, prefill_chunk=chunk).generate([ids], GREEDY)
    assert out == [reference_greedy(model, ids, GREEDY.max_new_tokens)]


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_batch_of_different_lengths_equals_each_alone(model, penalty):
    v = model.config.vocab_size
    prompts = [prompt(n, v, seed=n) for n in (3, 17, 9, 1)]
    params = SamplingParams(temperature=0.0, max_new_tokens=10, repetition_penalty=penalty)
    engine = Engine(model, prefill_chunk=6)
    batched = engine.generate(prompts, params)
    alone = [engine.generate([p], params)[0] for p in prompts]
    assert batched == alone
    if penalty != 1.0:  # the penalty sees the prompt but not the padding (token 0)
        assert alone[1] == reference_greedy(model, prompts[1], 10, penalty)


def test_seeded_sampling_is_reproducible(model):
    v = model.config.vocab_size
    prompts = [prompt(4, v, 1), prompt(7, v, 2)]
    params = SamplingParams(temperature=1.5, top_k=50, seed=7, max_new_tokens=16)
    engine = Engine(model)
    first = engine.generate(prompts, params)
    assert engine.generate(prompts, params) == first
    others = [engine.generate(prompts, SamplingParams(temperature=1.5, top_k=50, seed=s, max_new_tokens=16))
              for s in (8, 9)]
    assert any(o != first for o in others)
    assert first != engine.generate(prompts, SamplingParams(max_new_tokens=16))  # not secretly greedy


def test_stop_ids_end_each_row_on_its_own(model):
    v = model.config.vocab_size
    prompts = [prompt(5, v, 3), prompt(8, v, 4)]
    engine = Engine(model)
    free = engine.generate(prompts, GREEDY)
    # Stop row 0 at its 3rd token and row 1 at its 6th (first occurrences, so they end there).
    stops = [{free[0][2]}, {free[1][5]}]
    cut = [free[0].index(free[0][2]), free[1].index(free[1][5])]
    out = engine.generate(prompts, GREEDY, stop_ids=stops)
    assert out == [free[0][: cut[0] + 1], free[1][: cut[1] + 1]]  # stop token included, nothing after
    shared = engine.generate(prompts, GREEDY, stop_ids=stops[0])
    assert shared[0] == out[0]


@pytest.mark.parametrize("sync_every", [1, 4])
def test_finished_rows_yield_finished_and_the_loop_ends_early(model, sync_every):
    v = model.config.vocab_size
    prompts = [prompt(5, v, 5), prompt(6, v, 6)]
    steps = list(Engine(model, sync_every=sync_every).steps(prompts, GREEDY, max_new_tokens=[2, 5]))
    rows = torch.stack(steps, 1)
    assert (rows[0, 2:] == FINISHED).all() and (rows[0, :2] != FINISHED).all()
    assert (rows[1, :5] != FINISHED).all()
    # All rows are done after 5 steps; the engine notices at its next sync point.
    assert 5 <= len(steps) <= max(5, -(-5 // sync_every) * sync_every)


def test_generation_stops_at_the_context_length(model):
    ctx = model.config.max_position_embeddings
    ids = prompt(ctx - 3, model.config.vocab_size, 7)
    out = Engine(model, prefill_chunk=128).generate([ids], GREEDY)
    assert len(out[0]) == 3


@pytest.mark.parametrize("bad,message", [
    ([[]], "prompt 0 is empty"),
    ([], "no prompts"),
    ([[1, 2, 10**6]], "outside"),
])
def test_bad_prompts_are_one_line_errors(bad, message):
    from gemmaforge import Gemma, preset

    model = Gemma(preset("tiny-gemma3")).eval()
    with pytest.raises(GemmaforgeError, match=message):
        Engine(model).steps(bad, GREEDY)


def test_prompt_longer_than_context_is_an_error():
    from gemmaforge import Gemma, preset

    model = Gemma(preset("tiny-gemma2")).eval()
    ctx = model.config.max_position_embeddings
    with pytest.raises(GemmaforgeError, match=f"{ctx} tokens but the model's context is {ctx}"):
        Engine(model).generate([[1] * ctx], GREEDY)


def test_every_model_call_goes_through_forward(model):
    """The speed engineer's hook: a subclass overriding _forward sees the prefill and every step."""
    calls = []

    class Recording(Engine):
        def _forward(self, tokens, positions, cache, **where):
            calls.append(tokens.shape)
            return super()._forward(tokens, positions, cache, **where)

    ids = prompt(10, model.config.vocab_size, 8)
    out = Recording(model, prefill_chunk=4).generate([ids], SamplingParams(max_new_tokens=5))
    assert len(out[0]) == 5
    assert calls == [(1, 4), (1, 4), (1, 2)] + [(1, 1)] * 4
