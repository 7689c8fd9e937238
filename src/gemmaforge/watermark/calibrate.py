"""``gemmaforge watermark calibrate``: how well the watermark is detected, and what it costs.

1. Generate N watermarked and N plain completions of the longest length (same prompts, seeds and
   sampling; stop tokens are banned so every text reaches the length: the SynthID paper also
   scores fixed-length texts).
2. Score the first L tokens of each (the generated ids: no re-tokenization) for every length L:
   TPR of each detector at the false-positive rate (mean and weighted: their p-value; Bayesian:
   trained on one half of the texts, thresholded at the FPR on that half's plain texts, measured
   on the other half) with the FPR actually seen on the plain texts, and the ROC curves.
3. Perplexity of both sets under the model without watermark (exact weights, even when
   generation ran ``--quant``): the quality cost (docs/reference.md section 8).

Writes ``results.json`` and ``watermark_calibration.png`` under ``--out``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from ..atomic import write_bytes, write_text
from ..chat import encode_chat
from ..errors import GemmaforgeError
from ..generation.sampling import SamplingParams
from ..stats import wilson
from .bayesian import BayesianDetector, keys_fingerprint
from .config import WatermarkConfig
from .detector import features
from .processor import attach_watermark
from .scores import mean_p_value, mean_score, weighted_mean_score, weighted_p_value

# Open-ended requests (the embedded model is instruction-tuned: each is one user turn).
PROMPTS = [
    "Write a short story about a lighthouse keeper.", "Explain how rainbows form.",
    "Describe your ideal weekend.", "Write a letter to a friend you have not seen in years.",
    "What are the pros and cons of working from home?", "Tell me about the history of Rome.",
    "Write a poem about autumn leaves.", "Explain photosynthesis to a child.",
    "Describe a busy market in the morning.", "Give advice to someone starting their first job.",
    "Write a product review for a pair of running shoes.", "Why do people enjoy music?",
    "Describe the ocean to someone who has never seen it.", "Write a diary entry from a cat.",
    "Explain how a bicycle works.", "What would a city on Mars look like?",
]


def run_calibration(args) -> int:
    from ..commands.generate import load_model_and_tokenizer, make_engine

    lengths = _lengths(args.lengths)
    if args.n < 4 or args.batch_size < 1:
        raise GemmaforgeError(f"--n {args.n} / --batch-size {args.batch_size}: need n >= 4 and batch size >= 1")
    config = WatermarkConfig.load(args.keys)
    prompts = _prompts(args.prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.completions:  # a previous run's texts: re-score them (other lengths, detectors) without generating
        from ..commands.watermark import _tokenizer

        tokenizer = _tokenizer(args)
        ids = _chat_ids(tokenizer, prompts, args.n)
        texts = _load_completions(args.completions, ids, max(lengths))
    else:
        model, tokenizer = load_model_and_tokenizer(args)
        engine = make_engine(model, args, new_tokens=2 * args.n * max(lengths))
        wm = config.watermark(engine.device)
        ids = _chat_ids(tokenizer, prompts, args.n)
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                max_new_tokens=max(lengths))
        banned = sorted(tokenizer.stop_ids)
        texts = {name: _generate(engine, ids, params, args.batch_size, banned, mark, name)
                 for name, mark in (("watermarked", wm), ("plain", None))}
        write_text(out / "completions.json", json.dumps({"prompts": ids, **texts}) + "\n")
        del engine, model
    gen_s = time.time() - t0
    results = evaluate(config, texts["watermarked"], texts["plain"], lengths, fpr=0.01, seed=args.seed)
    ppl = _perplexities(args, ids, texts)
    results.update(perplexity=ppl, generation_seconds=round(gen_s, 1), n=args.n, lengths=lengths,
                   sampling={"temperature": args.temperature, "top_k": args.top_k, "seed": args.seed},
                   model=args.model or "embedded gemma3-270m", quant=args.quant, depth=config.depth,
                   ngram_len=config.ngram_len, seconds=round(time.time() - t0, 1))
    if args.save_detector:
        det = results.pop("_bayesian_all")
        det.save(args.save_detector)
    results.pop("_bayesian_all", None)
    write_text(out / "results.json", json.dumps(_public(results), indent=1) + "\n")
    plot(results, out / "watermark_calibration.png")
    _print_summary(results)
    return 0


def _generate(engine, ids, params, batch_size, banned, watermark, name):
    """Completions (token ids) of every prompt, ``batch_size`` at a time; row i of batch b gets
    seed ``params.seed + index`` so the two sets share seeds."""
    import dataclasses

    def setup(sched):
        def ban(logits, slots, steps):  # before the watermark: every text reaches the full length
            return logits.index_fill(1, torch.tensor(banned, device=logits.device), float("-inf"))

        sched.sampler.processors.append(ban)
        if watermark is not None:
            attach_watermark(sched, watermark)

    rows = []
    for start in range(0, len(ids), batch_size):
        t = time.time()
        batch = ids[start:start + batch_size]
        p = dataclasses.replace(params, seed=params.seed + start)
        steps = list(engine.steps(batch, p, (), setup=setup))
        table = torch.stack(steps, dim=1).tolist()
        rows += [[x for x in r if x >= 0] for r in table]
        print(f"gemmaforge: {name} {len(rows)}/{len(ids)} completions ({time.time() - t:.0f} s for this batch)",
              file=sys.stderr, flush=True)
    return rows


def evaluate(config: WatermarkConfig, marked, plain, lengths, fpr: float = 0.01, seed: int = 0) -> dict:
    """Detection at each length: TPR / FPR of each detector at ``fpr``, AUC, and ROC points."""
    wm = config.watermark()
    p0 = float(wm.sampling_table.float().mean())
    n = min(len(marked), len(plain))
    train = list(range(0, n, 2))  # the Bayesian detector's half; the other half measures it
    test = list(range(1, n, 2))
    longest = max(lengths)
    gw, mw = features(wm, [r[:longest] for r in marked[:n]])
    gp, mp = features(wm, [r[:longest] for r in plain[:n]])
    bayes = BayesianDetector.fit((gw[train], mw[train]), (gp[train], mp[train]), fpr=fpr, seed=seed)
    bayes.fingerprint = keys_fingerprint(config)
    out = {"fpr_target": fpr, "by_length": {}}
    for length in lengths:
        cut = length - config.ngram_len + 1  # n-grams within the first `length` tokens
        a, ma, b, mb = gw[:, :cut], mw[:, :cut], gp[:, :cut], mp[:, :cut]
        row = {}
        for kind in ("mean", "weighted"):
            if kind == "mean":
                sa, sb = mean_score(a, ma), mean_score(b, mb)
                pa, pb = mean_p_value(a, ma, p0), mean_p_value(b, mb, p0)
            else:
                sa, sb = weighted_mean_score(a, ma), weighted_mean_score(b, mb)
                pa, pb = weighted_p_value(a, ma, p0), weighted_p_value(b, mb, p0)
            row[kind] = _rates(sa, sb, (pa < fpr), (pb < fpr))
        with torch.no_grad():
            la, lb = bayes.log_odds(a, ma).double(), bayes.log_odds(b, mb).double()
        threshold = float(torch.quantile(lb[train], 1 - fpr))  # the training half's plain texts, this length
        row["bayesian"] = _rates(la[test], lb[test], la[test] > threshold, lb[test] > threshold)
        row["scored_ngrams"] = float(torch.cat([ma, mb]).sum(1).double().mean())
        out["by_length"][str(length)] = row
    # for --save-detector: trained on every text, thresholded at the longest length
    out["_bayesian_all"] = BayesianDetector.fit((gw, mw), (gp, mp), fpr=fpr, seed=seed)
    out["_bayesian_all"].fingerprint = keys_fingerprint(config)
    return out


def _chat_ids(tokenizer, prompts, n) -> list[list[int]]:
    """Prompt i of n: built-in (or --prompts) request i mod count, as one user turn."""
    return [encode_chat(tokenizer, [{"role": "user", "content": prompts[i % len(prompts)]}]) for i in range(n)]


def _load_completions(path, ids, length) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        texts = {name: [row[:length] for row in data[name]] for name in ("watermarked", "plain")}
    except (OSError, ValueError, KeyError) as e:
        raise GemmaforgeError(f"--completions {path}: not a completions.json of `watermark calibrate` ({e})") from None
    if data.get("prompts") != ids or any(len(r) < length for rows in texts.values() for r in rows):
        raise GemmaforgeError(f"--completions {path}: made with other prompts, --n or shorter --lengths")
    return texts


def _rates(pos: torch.Tensor, neg: torch.Tensor, pos_hit: torch.Tensor, neg_hit: torch.Tensor) -> dict:
    tpr, emp_fpr = float(pos_hit.double().mean()), float(neg_hit.double().mean())
    lo, hi = wilson(int(pos_hit.sum()), len(pos))
    fp, tp = _roc(pos, neg)
    auc = float(torch.trapezoid(torch.tensor(tp), torch.tensor(fp)))
    return {"tpr": tpr, "tpr_95ci": [lo, hi], "fpr_seen": emp_fpr, "auc": auc, "roc": [fp, tp],
            "positive_mean": float(pos.mean()), "negative_mean": float(neg.mean())}


def _roc(pos: torch.Tensor, neg: torch.Tensor) -> tuple[list[float], list[float]]:
    """Empirical ROC: (FPR, TPR) at every threshold, from (0, 0) to (1, 1)."""
    scores = torch.cat([pos, neg]).double()
    labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    order = torch.argsort(scores, descending=True)
    tp = torch.cat([torch.zeros(1), labels[order].cumsum(0)]) / len(pos)
    fp = torch.cat([torch.zeros(1), (1 - labels[order]).cumsum(0)]) / len(neg)
    return fp.tolist(), tp.tolist()


def _perplexities(args, ids, texts) -> dict:
    """Per-token perplexity of each set's completions (the longest length) under the exact,
    unwatermarked model, scored in one teacher-forced pass per text (eval/perplexity.py)."""
    from .. import load
    from ..eval.perplexity import IGNORE, Perplexity, nll_sums

    model = load(args.model, dtype=args.dtype, device=args.device)
    device = model.final_norm.weight.device
    out, nats = {}, {}
    for name, rows in texts.items():
        per_text = []
        for prompt, completion in zip(ids, rows):
            tokens = torch.tensor([prompt + completion], device=device)
            labels = torch.full_like(tokens, IGNORE)
            labels[0, len(prompt) - 1:-1] = tokens[0, len(prompt):]
            per_text.append(float(nll_sums(model, tokens, labels)[0]))
        count = sum(len(r) for r in rows)
        ppls = sorted(math.exp(x / len(r)) for x, r in zip(per_text, rows))
        nats[name] = torch.tensor(per_text, dtype=torch.float64)
        out[name] = {"ppl": Perplexity.of(sum(per_text), count).ppl, "median_text_ppl": ppls[len(ppls) // 2],
                     "tokens": count}
    out["relative_increase"] = out["watermarked"]["ppl"] / out["plain"]["ppl"] - 1
    # 95% bootstrap interval over prompts (the two sets share prompts and seeds: resample pairs)
    gen = torch.Generator().manual_seed(0)
    n, per = len(ids), out["watermarked"]["tokens"] / len(ids)
    pick = torch.randint(0, n, (2000, n), generator=gen)
    ratio = torch.exp((nats["watermarked"][pick].sum(1) - nats["plain"][pick].sum(1)) / (n * per)) - 1
    out["relative_increase_95ci"] = [float(ratio.quantile(0.025)), float(ratio.quantile(0.975))]
    return out


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GemmaforgeError("the calibration plot needs matplotlib: pip install matplotlib") from None
    lengths = [int(k) for k in results["by_length"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, style in (("mean", "o-"), ("weighted", "s-"), ("bayesian", "^-")):
        rows = [results["by_length"][str(n)][kind] for n in lengths]
        tpr = [r["tpr"] for r in rows]
        err = [[max(0.0, t - r["tpr_95ci"][0]) for t, r in zip(tpr, rows)],
               [max(0.0, r["tpr_95ci"][1] - t) for t, r in zip(tpr, rows)]]  # >= 0 despite rounding
        ax1.errorbar(lengths, tpr, yerr=err, fmt=style, capsize=3, label=kind)
    ax1.set(xlabel="text length (tokens)", ylabel="TPR at 1% FPR", ylim=(0, 1.02), xticks=lengths,
            title="Detection rate vs length (95% Wilson intervals)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    for n in lengths:
        fp, tp = results["by_length"][str(n)]["mean"]["roc"]
        ax2.plot(fp, tp, label=f"mean score, {n} tokens (AUC {results['by_length'][str(n)]['mean']['auc']:.3f})")
    ax2.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax2.axvline(0.01, color="grey", lw=0.8, ls="--")
    ax2.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (mean score)", xlim=(0, 1),
            ylim=(0, 1.02))
    ax2.set_xscale("symlog", linthresh=0.01)
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"SynthID-Text, depth {results['depth']}, ngram {results['ngram_len']}: "
                 f"{results['n']} watermarked vs {results['n']} plain completions", fontsize=10)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())  # atomic: a reader never sees half a PNG


def _public(results: dict) -> dict:
    return {k: v for k, v in results.items() if not k.startswith("_")}


def _print_summary(results: dict) -> None:
    for n, row in results["by_length"].items():
        parts = ", ".join(f"{k} {row[k]['tpr']:.2f} (FPR seen {row[k]['fpr_seen']:.2f})"
                          for k in ("mean", "weighted", "bayesian"))
        print(f"{n} tokens: TPR at 1% FPR: {parts}")
    ppl = results["perplexity"]
    print(f"perplexity: watermarked {ppl['watermarked']['ppl']:.2f}, plain {ppl['plain']['ppl']:.2f} "
          f"({100 * ppl['relative_increase']:+.1f}%)")


def _lengths(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise GemmaforgeError(f"--lengths {text!r}: give comma-separated token counts, e.g. 50,100,200") from None
    if not values or values[0] < 6:
        raise GemmaforgeError(f"--lengths {text!r}: each length must be at least 6 tokens")
    return values


def _prompts(path: str | None) -> list[str]:
    if path is None:
        return PROMPTS
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise GemmaforgeError(f"prompts file {path} not found") from None
    lines = [x for x in lines if x]
    if not lines:
        raise GemmaforgeError(f"prompts file {path} has no prompt (one per line)")
    return lines
