"""SynthID-Text watermarking against transformers' SynthIDTextWatermarkLogitsProcessor, in the engine
(per-row state, greedy and sampled), the detectors, the keys file and the CLI."""

import dataclasses
import json
import math

import pytest
import torch

import gemmaforge
from gemmaforge import GemmaforgeError, SamplingParams, load_tokenizer, preset
from gemmaforge.generation import Engine, Request, Sampler
from gemmaforge.watermark import (BayesianDetector, Detector, SynthIDTextWatermark, WatermarkConfig,
                                  attach_watermark, features, mean_p_value, mean_score, weighted_mean_score)
from gemmaforge.watermark.bayesian import keys_fingerprint
from gemmaforge.watermark.scores import binomial_tail

from conftest import CONFIGS, randomize

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor  # noqa: E402

KEYS = [654, 400, 836, 123, 340, 443, 597, 160, 57, 29]
NGRAM = 5


def hf_processor(keys=KEYS, ngram_len=NGRAM, size=2**16, seed=0, history=1024, skip=False):
    return SynthIDTextWatermarkLogitsProcessor(ngram_len=ngram_len, keys=keys, sampling_table_size=size,
                                               sampling_table_seed=seed, context_history_size=history,
                                               device="cpu", skip_first_ngram_calls=skip)


def ours(keys=KEYS, ngram_len=NGRAM, size=2**16, seed=0, history=1024, skip=False):
    return SynthIDTextWatermark(keys, ngram_len, size, seed, history, skip_first_ngram_calls=skip)


def hf_mean_score(proc, ids, eos=None):
    """The synthid-text reference mean score over transformers' own g-values and masks (its
    SynthIDTextWatermarkDetector's mask)."""
    g = proc.compute_g_values(ids).double()
    mask = proc.compute_context_repetition_mask(ids)
    if eos is not None:
        mask = mask & proc.compute_eos_token_mask(ids, eos)[:, proc.ngram_len - 1:]
    mask = mask.double()
    return (g * mask[..., None]).sum(dim=(1, 2)) / (g.shape[-1] * mask.sum(dim=1))


# ---- the processor's methods equal transformers' --------------------------------------------------
@pytest.mark.parametrize("size", [2**16, 1000])  # power of two (the int32 fast path) and not
def test_g_values_and_masks_equal_transformers(size):
    hf, wm = hf_processor(size=size, history=8), ours(size=size, history=8)
    assert torch.equal(wm.sampling_table, hf.sampling_table)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 3, (3, 200), generator=g)  # 3 symbols: contexts repeat, near and far
    ids[2] = torch.randint(0, 262144, (200,), generator=g)
    ids[1, 150:] = 1  # an EOS run
    for name in ("compute_g_values", "compute_context_repetition_mask"):
        a, b = getattr(hf, name)(ids), getattr(wm, name)(ids)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    mask = wm.compute_context_repetition_mask(ids)
    assert 0 < (~mask[0]).sum() < mask.shape[1] and mask[2].all()  # repeats both ways were exercised
    assert torch.equal(hf.compute_eos_token_mask(ids, 1), wm.compute_eos_token_mask(ids, 1))
    ngrams = ids.unfold(1, NGRAM, 1)
    assert torch.equal(hf.compute_ngram_keys(ngrams), wm.compute_ngram_keys(ngrams))
    assert wm.expected_mean_g_value(512) == hf.expected_mean_g_value(512)


@pytest.mark.parametrize("skip", [False, True])
def test_call_equals_transformers_step_by_step(skip):
    """The stateful batch call: zeros context at the first call, the last token shifted in after,
    repeated contexts left alone, filtered (-inf) tokens kept at the lowest float."""
    hf, wm = hf_processor(history=6, skip=skip), ours(history=6, skip=skip)
    g = torch.Generator().manual_seed(1)
    v = 3000
    ids = torch.randint(0, v, (3, 4), generator=g)
    for step in range(24):
        scores = torch.randn(3, v, generator=g) * 3
        scores[0, :100] = float("-inf")
        a, b = hf(ids, scores.clone()), wm(ids, scores.clone())
        assert torch.equal(a, b), step
        nxt = b.argmax(dim=1, keepdim=True) if step < 8 else ids[:, -4:-3]  # later steps repeat contexts
        ids = torch.cat([ids, nxt], dim=1)


def test_tournament_equals_update_scores_with_all_candidates():
    wm = ours()
    g = torch.Generator().manual_seed(2)
    scores, contexts = torch.randn(2, 700, generator=g), torch.randint(0, 700, (2, NGRAM - 1), generator=g)
    from gemmaforge.watermark.hashing import context_hash

    cand = wm.candidate_g_values(contexts, 700)
    assert torch.equal(wm.tournament(scores, context_hash(contexts)), hf_processor().update_scores(scores, cand))
    # after top-k (few finite scores) only those candidates are hashed: equal up to rounding
    kept = scores.masked_fill(scores < scores.topk(40, dim=1).values[:, -1:], float("-inf"))
    sparse, dense = wm.tournament(kept, context_hash(contexts)), hf_processor().update_scores(kept, cand)
    assert torch.equal(sparse == torch.finfo(torch.float32).min, dense == torch.finfo(torch.float32).min)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    # the tournament favours candidates with g = 1 at the first layer
    p = wm.tournament(scores, context_hash(contexts)).exp()
    assert (p * cand[..., 0]).sum(1).gt((scores.softmax(1) * cand[..., 0]).sum(1)).all()


# ---- in the engine --------------------------------------------------------------------------------
def hf_model(model):
    from test_model_hf import hf_model as build

    return build(model)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_greedy_generation_equals_transformers_generate(family):
    """HF applies the watermark in greedy search too; same model, keys and prompt, same tokens."""
    model = randomize(gemmaforge.Gemma(CONFIGS[family]), seed=3)
    prompt = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(0))
    cfg = transformers.SynthIDTextWatermarkingConfig(keys=KEYS, ngram_len=NGRAM, context_history_size=16)
    with torch.no_grad():
        ref = hf_model(model).generate(prompt, attention_mask=torch.ones_like(prompt), watermarking_config=cfg,
                                       do_sample=False, max_new_tokens=30, eos_token_id=None, pad_token_id=0)
    wm = ours(history=16)
    from gemmaforge.generation.api import _watermark_setup

    steps = list(Engine(model).steps(prompt.tolist(), SamplingParams(max_new_tokens=30), setup=_watermark_setup(wm)))
    mine = torch.stack(steps, dim=1)[0].tolist()
    assert mine == ref[0, 7:].tolist()
    assert mine != Engine(model).generate(prompt.tolist(), SamplingParams(max_new_tokens=30))[0]


@pytest.fixture(scope="module")
def tiny():
    return randomize(gemmaforge.Gemma(CONFIGS["gemma3"]), seed=4)


def prompts(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (int(k),), generator=g).tolist() for k in torch.randint(3, 9, (n,), generator=g)]


def watermarked(engine, ps, params, wm):
    from gemmaforge.generation.api import _watermark_setup

    steps = list(engine.steps(ps, params, setup=_watermark_setup(wm)))
    table = torch.stack(steps, dim=1).tolist()
    return [[t for t in row if t != -1] for row in table]


def test_batched_rows_get_the_tokens_they_get_alone(tiny):
    """Per-row state: row i of a batch (seed + i) is watermarked exactly as that prompt alone, with
    rows of different prompt lengths, a stop id that ends one early, sampled and greedy."""
    engine, wm = Engine(tiny), ours(history=8)
    ps = prompts(3)
    for params in (SamplingParams(temperature=0.7, top_k=40, seed=3, max_new_tokens=16, stop_token_ids=(7,)),
                   SamplingParams(max_new_tokens=16)):
        together = watermarked(engine, ps, params, wm)
        for i, p in enumerate(ps):
            alone = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            assert watermarked(engine, [p], alone, wm)[0] == together[i]
        assert together != engine.generate(ps, params)


def test_rows_joining_a_running_pool_restart_their_state(tiny):
    """A scheduler where requests arrive while others decode (a server): each request's tokens are
    those it gets alone; a request without a watermark (the chooser says None) is untouched."""
    engine, wm = Engine(tiny), ours(history=8)
    params = SamplingParams(temperature=1.0, seed=7, max_new_tokens=12)
    ps = prompts(4, seed=9)
    sched = engine.scheduler(2, 64)
    attach_watermark(sched, lambda req: None if req.prompt == ps[1] else wm)
    seqs = []
    for p in ps:
        seqs += sched.submit(Request(p, params))
        sched.step()
    while sched.has_work():
        sched.step()
    for p, s in zip(ps, seqs):
        expect = engine.generate([p], params)[0] if p == ps[1] else watermarked(engine, [p], params, wm)[0]
        assert s.tokens == expect


def test_each_row_is_a_fresh_transformers_processor_over_its_request():
    """Two pool rows, each running requests one after another with forced tokens: at every step a
    row's processed logits are those of a new transformers processor over that request alone.
    B repeats A's contexts one step earlier (a history kept across requests would skip them); C
    has periods 3 and 8 (repeats inside the history window of 8) and 9 (just outside it)."""
    from gemmaforge.watermark import WatermarkProcessor

    v, gen, history = 300, torch.Generator().manual_seed(6), 8
    base = torch.randint(60, v, (14,), generator=gen).tolist()
    queues = {0: [base[:6], base[1:]],  # A, then B in the same row
              1: [[5, 6, 7] * 3 + list(range(20, 28)) * 2 + list(range(40, 49)) * 2, base[::-1]]}  # C, D
    sampler = Sampler(2, v)
    sampler.processors.append(WatermarkProcessor(sampler, ours(history=history)))
    running = {}  # slot -> (forced tokens, transformers processor, tokens so far)
    while queues[0] or queues[1] or running:
        for slot in (0, 1):
            if slot not in running and queues[slot]:
                sampler.set_row(slot, SamplingParams(), [1, 2], seed=0)
                running[slot] = (queues[slot].pop(0), hf_processor(history=history), [])
        slots = sorted(running)
        logits = torch.randn(len(slots), v, generator=gen)
        for i, slot in enumerate(slots):
            forced, _, done = running[slot]
            logits[i, forced[len(done)]] += 60.0
        out = sampler.process(logits, slots)
        for i, slot in enumerate(slots):
            forced, ref, done = running[slot]
            expect = ref(torch.tensor([[1, 2] + done]), logits[i:i + 1].clone())
            assert torch.equal(out[i], expect[0]), (slot, len(done))
        for slot, t in zip(slots, sampler.sample(logits, slots).tokens.tolist()):
            forced, _, done = running[slot]
            assert t == forced[len(done)]
            done.append(t)
            if len(done) == len(forced):
                sampler.clear_row(slot)
                del running[slot]


def test_processor_runs_twice_at_a_step_without_changing_the_result(tiny):
    """``Sampler.process`` (inspection) then ``sample``: the history ring skips the step's own slot."""
    v = tiny.config.vocab_size
    sampler = Sampler(2, v)
    from gemmaforge.watermark import WatermarkProcessor

    sampler.processors.append(WatermarkProcessor(sampler, ours(history=3)))
    sampler.set_row(0, SamplingParams(), [5, 6, 7], seed=0)
    twin = Sampler(2, v)
    twin.processors.append(WatermarkProcessor(twin, ours(history=3)))
    twin.set_row(0, SamplingParams(), [5, 6, 7], seed=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        logits = torch.randn(1, v, generator=g)
        sampler.process(logits, [0])
        assert sampler.sample(logits, [0]).tokens.tolist() == twin.sample(logits, [0]).tokens.tolist()


def test_too_long_ngram_for_the_sampler_history_is_an_error():
    with pytest.raises(GemmaforgeError, match="history"):
        from gemmaforge.watermark import WatermarkProcessor

        WatermarkProcessor(Sampler(1, 512), ours(ngram_len=20))


# ---- detection ---------------------------------------------------------------------------------------
def test_our_watermarked_text_is_detected_by_us_and_by_transformers_scores(tiny):
    engine, wm = Engine(tiny), ours()
    ps = prompts(4, seed=13)
    params = SamplingParams(temperature=1.0, seed=1, max_new_tokens=40)
    marked, plain = watermarked(engine, ps, params, wm), engine.generate(ps, params)
    det = Detector(wm)
    hf = hf_processor()
    for row in marked:
        r = det.detect_ids(row)
        assert r.watermarked and r.p_value < 1e-6 and r.mean_score > 0.6
        assert math.isclose(r.mean_score, float(hf_mean_score(hf, torch.tensor([row]))[0]), rel_tol=1e-12)
    for row in plain:
        r = det.detect_ids(row)
        assert not r.watermarked and abs(r.mean_score - 0.5) < 0.1
        assert math.isclose(r.mean_score, float(hf_mean_score(hf, torch.tensor([row]))[0]), rel_tol=1e-12)


def test_text_transformers_watermarked_is_detected_by_ours(tiny):
    ref = hf_model(tiny)
    prompt = torch.randint(3, 500, (4, 6), generator=torch.Generator().manual_seed(3))
    cfg = transformers.SynthIDTextWatermarkingConfig(keys=KEYS, ngram_len=NGRAM)
    torch.manual_seed(0)
    with torch.no_grad():
        out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), watermarking_config=cfg,
                           do_sample=True, top_k=0, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
        plain = ref.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                             max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    det = Detector(ours())
    assert all(r.watermarked for r in det.detect_batch(out[:, 6:]))
    assert not any(r.watermarked for r in det.detect_batch(plain[:, 6:]))


def test_scores_and_p_values():
    g = torch.tensor([[[1, 1, 0], [1, 0, 0], [0, 0, 0]]])
    mask = torch.tensor([[True, True, False]])
    assert mean_score(g, mask).item() == pytest.approx(3 / 6)
    w = torch.linspace(10, 1, 3, dtype=torch.float64)
    w = w * 3 / w.sum()
    assert weighted_mean_score(g, mask).item() == pytest.approx((w[0] + w[1] + w[0]).item() / 6)
    # the binomial tail against a direct sum
    assert binomial_tail(7, 10, 0.5) == pytest.approx(sum(math.comb(10, k) for k in range(7, 11)) / 2**10)
    assert binomial_tail(0, 10, 0.5) == 1.0 and binomial_tail(11, 10, 0.5) == 0.0
    # under the null the p-value is (about) uniform: ~1% of random g-values fall below 0.01
    rnd = torch.randint(0, 2, (4000, 60, 10), generator=torch.Generator().manual_seed(0))
    p = mean_p_value(rnd, torch.ones(4000, 60, dtype=torch.bool))
    assert 0.005 < (p < 0.01).double().mean().item() < 0.016


def _bayes_data(n=300, length=30, depth=6, seed=0):
    """g-values shaped like the tournament's: layer l of watermarked text is 1 w.p. 3/4 with one
    distinct candidate or not (p two = 0.6), plain text fair coins."""
    gen = torch.Generator().manual_seed(seed)
    two = torch.rand(n, length, depth, generator=gen) < 0.6
    coin = torch.rand(n, length, depth, generator=gen)
    marked = torch.where(two, coin < 0.75, coin < 0.5).long()
    plain = (torch.rand(n, length, depth, generator=gen) < 0.5).long()
    mask = torch.rand(n, length, generator=gen) < 0.9
    return (marked, mask), (plain, mask)


def test_bayesian_detector_trains_saves_loads_and_matches_transformers(tmp_path):
    (gw, mw), (gp, mp) = _bayes_data()
    det = BayesianDetector.fit((gw[:200], mw[:200]), (gp[:200], mp[:200]), steps=150)
    held_w, held_p = det.log_odds(gw[200:], mw[200:]), det.log_odds(gp[200:], mp[200:])
    assert (held_w > det.threshold).double().mean() > 0.9  # TPR at the training 1% FPR
    assert (held_p > det.threshold).double().mean() < 0.06
    det.fingerprint = keys_fingerprint(WatermarkConfig(tuple(range(6))))
    det.save(tmp_path / "det.json")
    back = BayesianDetector.load(tmp_path / "det.json")
    assert torch.equal(back.log_odds(gw, mw), det.log_odds(gw, mw)) and back.threshold == det.threshold
    # transformers' BayesianDetectorModel with the same parameters gives the same posterior
    from transformers import BayesianDetectorConfig, BayesianDetectorModel

    hf = BayesianDetectorModel(BayesianDetectorConfig(watermarking_depth=6, base_rate=0.5)).eval()
    with torch.no_grad():
        hf.likelihood_model_watermarked.beta.copy_(det.beta)
        hf.likelihood_model_watermarked.delta.copy_(det.delta)
        hf.prior.fill_(0.5)
        short = (gw[:5, :3], mw[:5, :3])  # short texts: a posterior away from 0 and 1
        torch.testing.assert_close(det(*short), hf(*short)[0], atol=1e-6, rtol=1e-5)
    hf.save_pretrained(tmp_path / "hf")
    torch.testing.assert_close(BayesianDetector.load(tmp_path / "hf")(*short), det(*short), atol=1e-6, rtol=1e-5)
    # a detector for other keys is refused
    with pytest.raises(GemmaforgeError, match="other watermark keys"):
        Detector(ours(keys=[1, 2, 3, 4, 5, 6]), "bayesian", bayesian=back)


def test_detector_kinds_on_generated_text(tiny):
    engine, wm = Engine(tiny), ours()
    params = SamplingParams(temperature=1.0, seed=2, max_new_tokens=30)
    ps = prompts(8, seed=21)
    marked, plain = watermarked(engine, ps, params, wm), engine.generate(ps, params)
    gw, mw = features(wm, marked)
    gp, mp = features(wm, plain)
    bayes = BayesianDetector.fit((gw, mw), (gp, mp), steps=100)
    for kind in ("mean", "weighted", "bayesian"):
        det = Detector(wm, kind, bayesian=bayes)
        assert all(r.watermarked for r in det.detect_batch(marked)), kind
        assert sum(r.watermarked for r in det.detect_batch(plain)) <= 1, kind


def test_calibration_evaluates_and_plots(tiny, tmp_path):
    """The calibration's scoring on generated texts: TPR/FPR per length and detector, ROC from (0, 0)
    to (1, 1), and the plot file."""
    from gemmaforge.watermark.calibrate import evaluate, plot

    engine, config = Engine(tiny), WatermarkConfig(tuple(KEYS))
    params = SamplingParams(temperature=1.0, seed=4, max_new_tokens=30)
    ps = prompts(12, seed=17)
    res = evaluate(config, watermarked(engine, ps, params, config.watermark()), engine.generate(ps, params), [8, 30])
    short, long = res["by_length"]["8"], res["by_length"]["30"]
    assert long["mean"]["tpr"] == 1.0 and long["mean"]["fpr_seen"] <= 1 / 12
    assert short["mean"]["auc"] <= long["mean"]["auc"] and long["weighted"]["tpr"] == 1.0
    fp, tp = long["mean"]["roc"]
    assert (fp[0], tp[0], fp[-1], tp[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert isinstance(res["_bayesian_all"], BayesianDetector)
    pytest.importorskip("matplotlib")
    res.update(depth=config.depth, ngram_len=NGRAM, n=12)
    plot(res, tmp_path / "cal.png")
    assert (tmp_path / "cal.png").stat().st_size > 10_000


def test_short_text_is_an_error():
    with pytest.raises(GemmaforgeError, match="fewer than ngram_len=5"):
        Detector(ours()).detect_ids([1, 2, 3, 4])


# ---- the keys file ---------------------------------------------------------------------------------
def test_keys_file_round_trip_and_transformers_config(tmp_path):
    cfg = WatermarkConfig.random(7, ngram_len=4)
    cfg.save(tmp_path / "k.json")
    assert WatermarkConfig.load(tmp_path / "k.json") == cfg
    hf = transformers.SynthIDTextWatermarkingConfig(keys=KEYS, ngram_len=NGRAM).to_dict()
    (tmp_path / "hf.json").write_text(json.dumps(hf))
    wm = WatermarkConfig.load(tmp_path / "hf.json").watermark()
    assert torch.equal(wm.sampling_table, hf_processor().sampling_table) and wm.keys.tolist() == KEYS


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{\"keys\": [1, 2", "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ("{\"ngram_len\": 5}", "no 'keys'"),
    ("{\"keys\": [1, \"2\"]}", "64-bit integers"),
    ("{\"keys\": [1], \"ngram_len\": 1}", "ngram_len=1"),
    ("{\"keys\": [1], \"ngramlen\": 5}", "did you mean 'ngram_len'"),
])
def test_bad_keys_files(tmp_path, content, message):
    path = tmp_path / "k.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(GemmaforgeError, match=message):
        WatermarkConfig.load(path)


# ---- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, embedded_gguf):
    """A tiny network with Gemma 3's real vocabulary and tokenizer (random weights: gibberish text
    that still round-trips through the tokenizer well enough to detect)."""
    config = preset("tiny-gemma3").replace(vocab_size=262144, query_pre_attn_scalar=16, rope_local_theta=10000.0)
    d = tmp_path_factory.mktemp("wm") / "model"
    gemmaforge.save_pretrained(randomize(gemmaforge.Gemma(config), seed=1), d)
    load_tokenizer(embedded_gguf).save(d / "tokenizer.json")
    return d


def test_cli_generate_watermark_then_detect(model_dir, tmp_path, monkeypatch, capsys):
    from gemmaforge import cli

    keys = tmp_path / "keys.json"
    assert cli.main(["watermark", "keygen", "--out", str(keys), "--depth", "8"]) == 0
    fresh, again = WatermarkConfig.load(keys), WatermarkConfig.random(8)
    assert fresh.depth == 8 and len(set(fresh.keys)) == 8 and fresh.keys != again.keys
    # Fixed keys from here on: with fresh ones the plain text below is flagged in 1% of runs (the
    # detector's false-positive rate), so the test would fail by chance and not reproduce.
    dataclasses.replace(fresh, keys=tuple(KEYS[:8])).save(keys)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(""))
    capsys.readouterr()
    common = ["--model", str(model_dir), "--temperature", "1", "--seed", "0", "--max-new-tokens", "32"]
    assert cli.main(["generate", "Hello there", "--watermark", str(keys), *common]) == 0
    marked = capsys.readouterr().out.rstrip("\n")
    assert cli.main(["generate", "Hello there", *common]) == 0
    plain = capsys.readouterr().out.rstrip("\n")
    # the library gives the same watermarked text
    model, tok = gemmaforge.load(model_dir), load_tokenizer(model_dir)
    wm = WatermarkConfig.load(keys).watermark()
    assert gemmaforge.generate(model, tok, "Hello there", watermark=wm, temperature=1.0, seed=0,
                               max_new_tokens=32) == [marked]
    (tmp_path / "marked.txt").write_text(marked)
    assert cli.main(["watermark", "detect", "--keys", str(keys), "--model", str(model_dir), "--json",
                     "--file", str(tmp_path / "marked.txt")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"tokens", "mean_score", "p_value", "watermarked"}
    assert out["watermarked"] is True and out["p_value"] < 0.01 and out["tokens"] > 20
    assert cli.main(["watermark", "detect", "--keys", str(keys), "--model", str(model_dir), "--json", plain]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["watermarked"] is False and out["p_value"] > 0.05, out
    assert cli.main(["watermark", "detect", "--keys", str(keys), "--model", str(model_dir),
                     "--detector", "weighted", marked]) == 0
    assert capsys.readouterr().out.startswith("watermarked at 0.01 false-positive rate")
    # a Bayesian detector file for these keys (trained on tournament-like g-values)
    (gw, mw), (gp, mp) = _bayes_data(depth=8)
    det = BayesianDetector.fit((gw, mw), (gp, mp), steps=100)
    det.fingerprint = keys_fingerprint(WatermarkConfig.load(keys))
    det.save(tmp_path / "det.json")
    assert cli.main(["watermark", "detect", "--keys", str(keys), "--model", str(model_dir), "--json",
                     "--detector", "bayesian", "--detector-file", str(tmp_path / "det.json"), marked]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["detector"] == "bayesian" and out["watermarked"] is True and out["score"] > 0.99


@pytest.mark.parametrize("case", ["missing", "malformed", "short", "no text", "no text file", "bayesian without file"])
def test_cli_bad_input_is_one_line_and_exit_2(case, model_dir, tmp_path, capsys):
    from gemmaforge import cli

    keys = tmp_path / "keys.json"
    WatermarkConfig(tuple(KEYS)).save(keys)
    args = ["watermark", "detect", "--keys", str(keys), "--model", str(model_dir)]
    if case == "missing":
        args[3] = str(tmp_path / "nope.json")
        args.append("some text to check here")
    elif case == "malformed":
        keys.write_text("{\"keys\": [1, 2,")
        args.append("some text to check here")
    elif case == "short":
        args.append("Hi")
    elif case == "no text file":
        args += ["--file", str(tmp_path / "absent.txt")]
    elif case == "bayesian without file":
        args += ["--detector", "bayesian", "some text to check here"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gemmaforge: error: ") and "\n" not in err
    if case == "short":
        assert "fewer than ngram_len=5" in err


# ---- the server -------------------------------------------------------------------------------------
def _serve(model_dir, *flags):
    import argparse

    from starlette.testclient import TestClient

    from gemmaforge.commands import serve as serve_cmd

    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir), "--max-batch", "4", "--kv-budget-mb", "64", *flags])
    return TestClient(serve_cmd.build(args)[0])


def test_server_watermarks_every_completion_by_default(model_dir, tmp_path):
    """`gemmaforge serve --watermark KEYFILE`: the completion is what `generate(watermark=)` gives,
    names its key set, and detects as watermarked; a client cannot turn the mark off."""
    pytest.importorskip("fastapi")
    keys = tmp_path / "keys.json"
    WatermarkConfig(tuple(KEYS)).save(keys)
    body = {"prompt": "Hello there", "max_tokens": 24, "temperature": 1.0, "seed": 5}
    with _serve(model_dir, "--watermark", str(keys)) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        marked = r.json()
        off = client.post("/v1/completions", json={**body, "watermark": False})
        unknown = client.post("/v1/completions", json={**body, "watermark": "tenant-b"})
    assert marked["watermark"] == "keys"
    model, tok = gemmaforge.load(model_dir), load_tokenizer(model_dir)
    wm = WatermarkConfig.load(keys).watermark()
    text = marked["choices"][0]["text"]
    assert gemmaforge.generate(model, tok, "Hello there", watermark=wm, temperature=1.0, seed=5,
                               max_new_tokens=24) == [text]
    plain = gemmaforge.generate(model, tok, "Hello there", temperature=1.0, seed=5, max_new_tokens=24)[0]
    assert text != plain
    assert Detector(wm).detect_text(text, tok).p_value < Detector(wm).detect_text(plain, tok).p_value
    for r in (off, unknown):
        assert r.status_code == 400 and r.json()["error"]["param"] == "watermark", r.text
    assert "every completion" in off.json()["error"]["message"]
    assert "'keys'" in unknown.json()["error"]["message"]  # names the sets the server holds
    # a bad keys file stops the server before the model loads: one line, exit 2
    from gemmaforge import cli

    keys.write_text("{\"keys\": [1,")
    assert cli.main(["serve", "--model", str(model_dir), "--watermark", str(keys)]) == 2


def test_server_watermarks_per_request_inside_one_batch(model_dir, tmp_path):
    """`--watermark a=.. --watermark b=.. --watermark-requests opt-in`: three concurrent requests
    (keys a, plain, keys b) share the pool; each gets exactly what `generate` gives it alone."""
    pytest.importorskip("fastapi")
    from concurrent.futures import ThreadPoolExecutor

    sets = {"a": KEYS, "b": [k + 1000 for k in KEYS]}
    for name, ks in sets.items():
        WatermarkConfig(tuple(ks)).save(tmp_path / f"{name}.json")
    flags = [x for name in sets for x in ("--watermark", f"{name}={tmp_path / name}.json")]
    asks = {"a": "a", "plain": None, "b": "b", "true": True}
    body = {"prompt": "Hello there", "max_tokens": 40, "temperature": 1.0, "seed": 7}
    with _serve(model_dir, *flags, "--watermark-requests", "opt-in") as client:
        def post(ask):
            return client.post("/v1/completions", json=body if ask is None else {**body, "watermark": ask})

        with ThreadPoolExecutor(len(asks)) as pool:
            answers = dict(zip(asks, pool.map(post, asks.values())))
        assert client.get("/metrics").status_code == 200
    for r in answers.values():
        assert r.status_code == 200, r.text
    texts = {k: r.json()["choices"][0]["text"] for k, r in answers.items()}
    assert [answers[k].json().get("watermark") for k in asks] == ["a", None, "b", "a"]
    model, tok = gemmaforge.load(model_dir), load_tokenizer(model_dir)
    marks = {name: WatermarkConfig.load(tmp_path / f"{name}.json").watermark() for name in sets}
    for k, mark in (("a", marks["a"]), ("plain", None), ("b", marks["b"]), ("true", marks["a"])):
        assert gemmaforge.generate(model, tok, "Hello there", watermark=mark, temperature=1.0, seed=7,
                                   max_new_tokens=40) == [texts[k]], k
    assert len({texts["a"], texts["plain"], texts["b"]}) == 3
    detect = {name: Detector(m) for name, m in marks.items()}
    assert detect["a"].detect_text(texts["a"], tok).p_value < detect["a"].detect_text(texts["b"], tok).p_value
    assert detect["b"].detect_text(texts["b"], tok).p_value < detect["b"].detect_text(texts["a"], tok).p_value


def test_watermark_field_on_a_server_without_keys_is_a_400():
    from gemmaforge.serving.protocol import ApiError, _watermark

    with pytest.raises(ApiError, match="holds no watermark keys") as e:
        _watermark({"watermark": True}, (), None)
    assert e.value.status == 400 and e.value.param == "watermark"
    assert _watermark({}, (), None) is None
    assert _watermark({"watermark": False}, ("a",), None) is None  # opt-in: false is plain
    with pytest.raises(ApiError, match="must be true, false or one of"):
        _watermark({"watermark": 1}, ("a",), "a")


def test_stream_with_watermark_gives_generates_text(model_dir):
    model, tok = gemmaforge.load(model_dir), load_tokenizer(model_dir)
    wm = ours()
    opts = dict(temperature=1.0, seed=9, max_new_tokens=20)
    streamed = "".join(gemmaforge.stream(model, tok, "Hello there", watermark=wm, **opts))
    assert [streamed] == gemmaforge.generate(model, tok, "Hello there", watermark=wm, **opts)
    assert [streamed] != gemmaforge.generate(model, tok, "Hello there", **opts)
