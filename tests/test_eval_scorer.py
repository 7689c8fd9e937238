"""The evaluation scorer (eval/scorer.py) and GemmaforgeLM (eval/lm.py) against two oracles: one full
forward per (context, continuation) on our model, and lm-eval's own HF backend (HFLM) on the same
weights in transformers, with the real Gemma tokenizer (from the embedded GGUF)."""

import pytest
import torch

import gemmaforge
from conftest import CONFIGS, randomize
from gemmaforge import Gemma
from gemmaforge.eval.scorer import Scorer, rolling_windows
from test_model_hf import hf_model

lm_eval = pytest.importorskip("lm_eval")


@torch.no_grad()
def full_forward_score(model, ctx, cont):
    logits = model(torch.tensor([ctx + cont]))[0, len(ctx) - 1 : -1].float()
    logp = torch.log_softmax(logits, -1)
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_shared_prefixes_and_forked_choices_score_like_full_forwards(name, batch_size):
    """Questions sharing a few-shot block (prefilled once, forked), several choices each (forked),
    choices of different lengths, a context longer than the window: every score equals the full
    forward of its own sequence."""
    model = randomize(Gemma(CONFIGS[name]))
    v = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, v, (n,), generator=g).tolist()

    shots = [1] + ids(13)  # longer than the tiny window (8)
    requests = []
    for q in range(4):
        ctx = shots + ids(2 + q)
        for k in range(3):
            requests.append((ctx, ids(1 + (k + q) % 3)))
    requests.append(([1], ids(4)))  # an empty context is just <bos>
    scorer = Scorer(model, _NoTokenizer(), batch_size=batch_size, progress=False)
    got = scorer.loglikelihood_tokens(requests)
    for (ctx, cont), (lp, greedy) in zip(requests, got):
        want = full_forward_score(model, ctx, cont)
        assert lp == pytest.approx(want[0], abs=1e-4) and greedy == want[1]


@pytest.mark.parametrize("budget", [1, 3])
def test_continuations_wider_than_the_column_budget_go_in_pieces(monkeypatch, budget):
    """A continuation longer than the scoring forward's column budget (a rolling window of a
    long document) is fed in pieces of columns: the same scores as one full forward, whose greedy
    flag also sees every piece."""
    import gemmaforge.eval.scorer as scorer_module

    monkeypatch.setattr(scorer_module, "_COLUMNS_PER_FORWARD", budget)
    model = randomize(Gemma(CONFIGS["gemma3"]))
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()
    ctx = [1] + ids(5)
    requests = [(ctx, ids(11)), (ctx, ids(2)), ([1] + ids(3), ids(17))]
    with torch.no_grad():  # one continuation the model predicts greedily all the way: greedy True
        greedy_cont = []
        for _ in range(9):
            greedy_cont.append(int(model(torch.tensor([ctx + greedy_cont]))[0, -1].argmax()))
    requests.append((ctx, greedy_cont))
    got = Scorer(model, _NoTokenizer(), batch_size=4, progress=False).loglikelihood_tokens(requests)
    for (c, cont), (lp, greedy) in zip(requests, got):
        want = full_forward_score(model, c, cont)
        assert lp == pytest.approx(want[0], abs=1e-4) and greedy == want[1]
    assert got[-1][1] is True


class _NoTokenizer:
    bos_id = 1
    stop_ids = frozenset({2})


def test_rolling_windows_are_lm_evals():
    from lm_eval import utils

    tokens = list(range(10, 33))
    for max_len in (4, 7, 23, 40):
        want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(tokens, 1, max_len, 1)]
        assert rolling_windows(tokens, 1, max_len) == [tuple(map(list, w)) for w in want]


# ---- against lm-eval's HF backend with the real tokenizer -------------------------------------------------------
@pytest.fixture(scope="module")
def pair(embedded_gguf):
    """A small random Gemma 3 with the real 262k vocabulary: ours and its transformers twin."""
    transformers = pytest.importorskip("transformers")
    config = CONFIGS["gemma3"].replace(vocab_size=262144, sliding_window=16, max_position_embeddings=128)
    model = randomize(Gemma(config), seed=3)
    tok = gemmaforge.load_tokenizer(embedded_gguf)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(embedded_gguf.parent), gguf_file=embedded_gguf.name)
    from lm_eval.models.huggingface import HFLM

    hflm = HFLM(pretrained=hf_model(model), tokenizer=hf_tok, batch_size=4, max_length=128)
    return model, tok, hflm


def instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [("Question: What is 2 + 2?\nAnswer:", " 4"), ("Question: What is 2 + 2?\nAnswer:", " five"),
         ("The cat sat on the ", "mat."), ("", "Hello world"), ("Paris is in", " France, of course")]


def test_loglikelihood_equals_lm_evals_hf_backend(pair):
    from gemmaforge.eval.lm import GemmaforgeLM

    model, tok, hflm = pair
    want = hflm.loglikelihood(instances("loglikelihood", PAIRS), disable_tqdm=True)
    lm = GemmaforgeLM(model=model, tokenizer=tok, batch_size=3)
    got = lm.loglikelihood(instances("loglikelihood", PAIRS))
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    texts = ["A short text.", "Longer text " * 30]  # 2 rolling windows of 128 tokens
    want = hflm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]))
    assert got == pytest.approx(want, abs=1e-3)


def test_generate_until_equals_lm_evals_hf_backend(pair):
    from gemmaforge.eval.lm import GemmaforgeLM

    model, tok, hflm = pair
    args = [("Q: Name a color.\nA:", {"until": ["\n", "Q:"], "max_gen_toks": 12, "do_sample": False}),
            ("Once upon a time", {"until": ["."], "max_gen_toks": 8, "do_sample": False})]
    want = hflm.generate_until(instances("generate_until", args), disable_tqdm=True)
    got = GemmaforgeLM(model=model, tokenizer=tok, batch_size=2).generate_until(instances("generate_until", args))
    assert got == want


def test_registered_under_gemmaforge_in_lm_evals_registry():
    from lm_eval.api.registry import get_model

    import gemmaforge.eval.lm as lm

    assert get_model("gemmaforge") is lm.GemmaforgeLM
