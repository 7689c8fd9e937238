"""Per-document metrics, filters, aggregation and standard errors: lm-eval's definitions
(``lm_eval/api/metrics.py``, ``ConfigurableTask.process_results``, ``lm_eval/filters``,
``evaluator_utils._compute_task_aggregations``, ``api/group.py``).

- multiple choice: ``acc`` = [argmax of the summed log-likelihoods is the gold index];
  ``acc_norm`` = the same after dividing each choice's log-likelihood by the choice's length in
  characters (``len(choice)``, without the target delimiter; lm-eval's ``acc_bytes`` would use
  UTF-8 bytes); ties go to the first choice (``np.argmax``);
- ``exact_match`` (generation): HF evaluate's rule as lm-eval ports it: each ``regexes_to_ignore``
  removed from both sides, optional lower-casing, then string equality;
- ``pass_at_1`` (MBPP): the sandbox's verdict on one greedy program (eval/sandbox.py);
- perplexities: ``weighted_perplexity`` = exp(-sum ll / sum units), ``bits_per_byte`` =
  -sum ll / sum bytes / ln 2.

Standard errors are lm-eval's: ``mean`` has the closed form sample-stddev / sqrt(n) (Bessel
corrected; "N/A" for a single document); lm-eval bootstraps only median, mcc, f1, perplexity
(the aggregation of per-document ``perplexity``, not the weighted ones), bleu, chrf, ter and nanmean,
none of which these tasks use, so the weighted perplexities, bits_per_byte and BBQ's bias scores
report "N/A" exactly as lm-eval does. A group's score is the size-weighted mean of its leaves with
the pooled standard error ``sqrt(sum((n_i - 1) * se_i^2 * n_i) / (sum n_i - k) / sum n_i)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from .tasks import bbq
from .tasks.spec import Doc, Filter, TaskSpec


# ---- filters -----------------------------------------------------------------------------------------------
def regex_filter(resps: list[str], regex_pattern: str = r"#### (\-?[0-9\.\,]+)", group_select: int = 0,
                 fallback: str = "[invalid]") -> list[str]:
    pattern, out = re.compile(regex_pattern), []
    for resp in resps:
        if not isinstance(resp, str):
            resp = ""
        match = pattern.findall(resp)
        if match:
            match = match[group_select]
            if isinstance(match, tuple):
                match = [m for m in match if m]
                match = match[0] if match else fallback
            match = match.strip()
        else:
            match = fallback
        out.append(match)
    return out


def apply_filter(f: Filter, resps: list) -> object:
    """One document's responses (one per repeat) through a filter pipeline."""
    value = resps
    for name, kwargs in f.steps:
        if name == "regex":
            value = regex_filter(value, **kwargs)
        elif name == "take_first":
            value = value[0]
        else:
            raise ValueError(f"filter {name!r} is not implemented")
    return value


# ---- per-document metrics ------------------------------------------------------------------------------------
def exact_match(prediction: str, reference: str, regexes_to_ignore=None, ignore_case=False,
                ignore_punctuation=False, ignore_numbers=False) -> float:
    import string

    for s in regexes_to_ignore or ():
        prediction, reference = re.sub(s, "", prediction), re.sub(s, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    for flag, chars in ((ignore_punctuation, string.punctuation), (ignore_numbers, string.digits)):
        if flag:
            table = str.maketrans("", "", chars)
            prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def multiple_choice_results(spec: TaskSpec, doc: Doc, results: Sequence[tuple[float, bool]]) -> dict:
    lls = np.array([ll for ll, _ in results])
    choices = spec.doc_to_choice(doc)
    completion_len = np.array([float(len(c)) for c in choices])
    pred, pred_norm = np.argmax(lls), np.argmax(lls / completion_len)
    gold = spec.doc_to_text(doc) if spec.multiple_input else spec.doc_to_target(doc)
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else -100
    elif gold >= len(choices):
        gold = -100
    names = {m.name for m in spec.metrics}
    out = {}
    if "acc" in names:
        out["acc"] = 1.0 if pred == gold else 0.0
    if "acc_norm" in names:
        out["acc_norm"] = 1.0 if pred_norm == gold else 0.0
    return out


def process_results(spec: TaskSpec, doc: Doc, results: list, code_results=None) -> dict:
    """``results``: the filtered responses of the document's requests, in request order."""
    if spec.process_results is not None:
        return spec.process_results(doc, results)
    if spec.output_type == "multiple_choice":
        return multiple_choice_results(spec, doc, results)
    if spec.output_type == "generate_until":
        gold, result = spec.doc_to_target(doc), results[0]
        out = {}
        for m in spec.metrics:
            if m.name == "exact_match":
                out["exact_match"] = exact_match(result, str(gold), **m.kwargs)
            elif m.name == "pass_at_1":
                out["pass_at_1"] = float(code_results[(gold, result)])
            else:
                raise ValueError(f"metric {m.name!r} is not implemented")
        return out
    raise ValueError(f"{spec.name}: output type {spec.output_type!r} needs a process_results")


# ---- aggregation ---------------------------------------------------------------------------------------------
def mean(arr):
    return sum(arr) / len(arr)


def weighted_mean(items):
    a, b = zip(*items)
    return sum(a) / sum(b)


def weighted_perplexity(items):
    return math.exp(-weighted_mean(items))


def bits_per_byte(items):
    return -weighted_mean(items) / math.log(2)


AGGREGATIONS = {"mean": mean, "weighted_perplexity": weighted_perplexity, "bits_per_byte": bits_per_byte,
                **bbq.AGGREGATIONS}


def sample_stddev(arr) -> float:
    mu = mean(arr)
    return math.sqrt(sum((x - mu) ** 2 for x in arr) / (len(arr) - 1))


def mean_stderr(arr) -> float:
    return sample_stddev(arr) / math.sqrt(len(arr))


STDERR = {"mean": mean_stderr}  # lm-eval's closed forms; the other aggregations here report "N/A"


def aggregate(spec: TaskSpec, raw: dict[tuple[str, str], list]) -> tuple[dict, int]:
    """{(metric, filter): per-document values} -> ({"metric,filter": value, "metric_stderr,filter": se}, n)."""
    out, n = {}, 0
    aggregation = {m.name: m.aggregation for m in spec.metrics}
    for (metric, key), items in raw.items():
        how = aggregation.get(metric, "mean")
        out[f"{metric},{key}"] = _plain(AGGREGATIONS[how](items))
        stderr = STDERR.get(how)
        out[f"{metric}_stderr,{key}"] = _plain(stderr(items)) if stderr and len(items) > 1 else "N/A"
        n = max(n, len(items))
    return out, n


def pooled_sample_stderr(stderrs: list[float], sizes: list[int]) -> float:
    var = sum((size - 1) * se**2 * size for size, se in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return float(np.sqrt(var / sum(sizes)))


def aggregate_group(metric_key: str, stderr_key: str, leaves: list[dict], weight_by_size: bool = True) -> dict:
    """A group's size-weighted mean and pooled stderr over the leaves that report ``metric_key``."""
    have = [r for r in leaves if metric_key in r]
    if not have:
        return {}
    sizes = [r.get("sample_len", 0) for r in have]
    weights = sizes if weight_by_size else [1] * len(sizes)
    out = {metric_key: sum(r[metric_key] * w for r, w in zip(have, weights)) / sum(weights)}
    stderrs = [r.get(stderr_key) for r in have]
    if all(s is not None for s in stderrs) and "N/A" not in stderrs:
        out[stderr_key] = (pooled_sample_stderr(stderrs, sizes) if weight_by_size
                           else float(np.sqrt(sum(s**2 for s in stderrs)) / len(stderrs)))
    else:
        out[stderr_key] = "N/A"
    return out


def _plain(x):
    """numpy scalars as Python numbers (JSON)."""
    return x.item() if isinstance(x, np.generic) else x
