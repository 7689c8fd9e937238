"""Sampling: each processor against transformers' own logits processors, on random logits."""

import math

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

from gemmaforge import GemmaforgeError, SamplingParams
from gemmaforge.generation.sampling import new_generator, process_logits, sample

B, V = 4, 1000


def random_logits(seed=0, scale=3.0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * scale


def history(seed=0, length=30):
    """Token ids already in each sequence (with repeats), and the same as a bool mask."""
    ids = torch.randint(0, V, (B, length), generator=torch.Generator().manual_seed(seed + 100))
    seen = torch.zeros(B, V, dtype=torch.bool)
    seen[torch.arange(B)[:, None], ids] = True
    return ids, seen


def assert_same_distribution(ours, theirs):
    kept_ours, kept_theirs = torch.isfinite(ours), torch.isfinite(theirs)
    assert torch.equal(kept_ours, kept_theirs)
    assert 0 < kept_ours.sum() < B * V  # the case filtered something, and kept something
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(penalty):
    logits, (ids, seen) = random_logits(), history()
    ours = process_logits(logits, SamplingParams(repetition_penalty=penalty), seen)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_matches_hf(k):
    logits = random_logits(1)
    ours = process_logits(logits, SamplingParams(temperature=1.0, top_k=k))
    assert_same_distribution(ours, TopKLogitsWarper(k)(None, logits.clone()))
    assert (torch.isfinite(ours).sum(-1) == k).all()


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(p):
    logits = random_logits(2)
    ours = process_logits(logits, SamplingParams(temperature=1.0, top_p=p))
    assert_same_distribution(ours, TopPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_matches_hf(min_p):
    logits = random_logits(3)
    ours = process_logits(logits, SamplingParams(temperature=1.0, min_p=min_p))
    assert_same_distribution(ours, MinPLogitsWarper(min_p)(None, logits.clone()))


def test_all_processors_in_hf_order():
    """HF order: repetition penalty, temperature, top-k, top-p, min-p (GenerationMixin)."""
    logits, (ids, seen) = random_logits(4, scale=2.0), history(4)
    params = SamplingParams(temperature=0.7, top_k=200, top_p=0.8, min_p=0.02, repetition_penalty=1.2)
    hf = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(200),
        TopPLogitsWarper(0.8), MinPLogitsWarper(0.02),
    ])
    assert_same_distribution(process_logits(logits, params, seen), hf(ids, logits.clone()))


def test_greedy_is_argmax_after_the_penalty():
    logits, (ids, seen) = random_logits(5), history(5)
    ids[:, 0] = logits.argmax(-1)  # each row has already produced its favourite token
    seen[torch.arange(B), ids[:, 0]] = True
    params = SamplingParams(temperature=0.0, top_k=3, repetition_penalty=2.0)
    expected = RepetitionPenaltyLogitsProcessor(2.0)(ids, logits.clone()).argmax(-1)
    assert torch.equal(sample(logits, params, seen=seen), expected)
    assert not torch.equal(expected, logits.argmax(-1))


def test_seeded_sampling_repeats_and_seeds_differ():
    logits = random_logits(6, scale=0.5)  # flat enough that draws vary
    params = SamplingParams(temperature=1.0, seed=123)
    draws = [sample(logits, params, new_generator(params)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    other = SamplingParams(temperature=1.0, seed=124)
    assert not all(torch.equal(sample(logits, other, new_generator(other)), draws[0]) for _ in range(3))


def test_samples_follow_the_filtered_distribution():
    """Empirical frequencies of 20k draws match softmax(processed logits) (chi-square-ish bound)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(20000, 6)
    params = SamplingParams(temperature=0.8, top_k=4, seed=0)
    draws = sample(logits, params, new_generator(params))
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    expected = process_logits(logits[:1], params).softmax(-1)[0]
    assert freq[4:].sum() == 0  # filtered by top-k: never drawn
    assert torch.allclose(freq, expected, atol=0.015)


@pytest.mark.parametrize("field,value,fragment", [
    ("temperature", -0.1, "temperature=-0.1"),
    ("temperature", math.nan, ">= 0"),
    ("top_k", 2.5, "integer >= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("min_p", -0.01, "[0, 1]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("max_new_tokens", 0, "integer >= 1"),
    ("seed", -1, "seed=-1"),
    ("stop", ("",), "non-empty"),
])
def test_invalid_values_name_the_field_and_range(field, value, fragment):
    with pytest.raises(GemmaforgeError, match=field if field != "stop" else "stop string") as e:
        SamplingParams(**{field: value})
    assert fragment in str(e.value)


def test_stop_accepts_one_string():
    assert SamplingParams(stop="\n").stop == ("\n",)
