"""The evaluation harness: tasks -> requests -> one Scorer call per request type -> lm-eval's results.

    from gemmaforge.eval.harness import evaluate
    out = evaluate(scorer, ["arc_easy", "mmlu"], DataSource("eval_data"), limit=100)
    out.results["results"]["arc_easy"]["acc,none"]      # lm-eval's results JSON shape
    out.samples["arc_easy"][0]["filtered_resps"]         # lm-eval's per-sample records
    print(markdown_table(out.results)); write_outputs(out, "results_dir")

The steps are lm-eval's ``simple_evaluate`` / ``evaluate`` (``lm_eval/evaluator.py``):

1. ``plan``: per task, the evaluated documents (``--limit``: the first N, or a fraction below 1),
   their few-shot prompts (eval/fewshot.py) and requests: one ``loglikelihood`` per choice of a
   multiple-choice document, one ``generate_until`` per generation document, one
   ``loglikelihood_rolling`` per perplexity document.
2. ``run``: all requests of one type, from every task, go to the Scorer in one call (it sorts and
   batches them: shared few-shot prefixes computed once); then each task's filters, the MBPP
   programs in the sandbox (eval/sandbox.py), per-document metrics, aggregation with standard
   errors (eval/metrics.py), and the MMLU groups.

The scorer is anything with lm-eval's three request methods on plain arguments: ``loglikelihood(
[(context, continuation)]) -> [(logprob, is_greedy)]``, ``loglikelihood_rolling([text]) -> [logprob]``
and ``generate_until([(context, gen_kwargs)]) -> [text]`` (eval/scorer.py's ``Scorer``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic import write_text
from ..errors import GemmaforgeError
from . import fewshot, metrics
from .data import DataSource
from .sandbox import Limits, run_programs
from .tasks import resolve
from .tasks.spec import GENERATE_UNTIL, LOGLIKELIHOOD_ROLLING, MULTIPLE_CHOICE, GroupSpec, TaskSpec

BOOTSTRAP_ITERS = 100000  # lm-eval's default; no metric of these tasks is bootstrapped (metrics.py)


@dataclass
class Request:
    """One model call, as lm-eval's ``Instance``: responses per repeat, filtered responses per filter."""

    request_type: str
    arguments: tuple
    idx: int
    resps: list = field(default_factory=list)
    filtered: dict = field(default_factory=dict)


@dataclass
class TaskRun:
    spec: TaskSpec
    num_fewshot: int
    n_original: int  # documents in the evaluated split
    docs: list[tuple[int, dict]]  # (doc_id, processed document) of the evaluated ones
    requests: list[list[Request]]  # per document, in idx order


@dataclass
class Plan:
    tasks: list[TaskRun]
    groups: list[GroupSpec]
    skipped: list[str]  # MMLU subjects without test documents
    seed: int | None = fewshot.DEFAULT_SEED

    def requests(self, kind: str | None = None) -> list[Request]:
        return [r for t in self.tasks for rs in t.requests for r in rs if kind is None or r.request_type == kind]

    def max_new_tokens(self) -> int:
        """An upper bound on the tokens the generation requests will decode."""
        return sum(int(r.arguments[1].get("max_gen_toks", 256)) for r in self.requests("generate_until"))


@dataclass
class Output:
    results: dict  # lm-eval's results JSON
    samples: dict[str, list[dict]]  # per task: lm-eval's per-sample records (in memory: raw values)


def sample_size(n_docs: int, limit: float | None) -> int | None:
    """lm-eval's ``get_sample_size``: a fraction below 1 of the documents, or a count."""
    if limit is None:
        return None
    return int(math.ceil(n_docs * limit)) if limit < 1.0 else int(limit)


def check_limit(limit: float | None) -> None:
    if limit is not None and not limit > 0:
        raise GemmaforgeError(f"--limit {limit:g} selects no documents: give a count (e.g. 100) or a fraction "
                              "below 1 (e.g. 0.1), or leave it out for every document")


# ---- 1. requests -----------------------------------------------------------------------------------------------
def plan(task_names: list[str], data: DataSource, *, num_fewshot: int | None = None, limit: float | None = None,
         seed: int | None = fewshot.DEFAULT_SEED, progress: bool = False) -> Plan:
    check_limit(limit)
    if num_fewshot is not None and num_fewshot < 0:
        raise GemmaforgeError(f"--num-fewshot {num_fewshot} is negative: give 0 or more examples")
    leaves, groups = resolve(task_names)
    runs, skipped = [], []
    for spec in leaves:
        rows = data.rows(spec, spec.eval_split)
        if not rows and spec.row_filter is not None:  # an MMLU subject the files do not hold
            skipped.append(spec.name)
            continue
        if not rows:
            raise GemmaforgeError(f"{spec.name}: the {spec.eval_split} split is empty: expected "
                                  f"{data.describe(spec, spec.eval_split)}")
        docs = [spec.process_docs(r) for r in rows] if spec.process_docs else rows
        n = num_fewshot if num_fewshot is not None else (spec.num_fewshot or 0)
        sampler = None
        if n > 0 and spec.output_type != LOGLIKELIHOOD_ROLLING:
            if spec.fewshot_samples is not None and spec.fewshot_split is None:
                pool = list(spec.fewshot_samples)
            else:
                pool = data.rows(spec, spec.fewshot_source)
                pool = [spec.process_docs(r) for r in pool] if spec.process_docs else pool
            sampler = fewshot.Sampler(spec, pool, seed)
        chosen = list(enumerate(docs))[: sample_size(len(docs), limit)]
        requests = []
        for _, doc in tqdm(chosen, desc=f"{spec.name}: prompts", disable=not progress, leave=False):
            requests.append(_requests(spec, doc, sampler.sample(n, doc) if sampler else []))
        runs.append(TaskRun(spec, n, len(docs), chosen, requests))
    if not runs:
        raise GemmaforgeError(f"no documents to evaluate: the data hold none of {', '.join(skipped)}")
    return Plan(runs, groups, skipped, seed)


def _requests(spec: TaskSpec, doc: dict, shots: list[dict]) -> list[Request]:
    if spec.output_type == MULTIPLE_CHOICE:
        ctx = fewshot.context(spec, doc, shots)
        return [Request("loglikelihood", a, i) for i, a in enumerate(fewshot.loglikelihood_arguments(spec, doc, ctx))]
    if spec.output_type == GENERATE_UNTIL:
        ctx = fewshot.context(spec, doc, shots)
        return [Request("generate_until", (ctx, copy.deepcopy(dict(spec.generation_kwargs))), 0)]
    if spec.output_type == LOGLIKELIHOOD_ROLLING:
        return [Request("loglikelihood_rolling", (spec.doc_to_target(doc),), 0)]
    raise ValueError(f"{spec.name}: unknown output type {spec.output_type!r}")


# ---- 2. model calls, metrics, aggregation -------------------------------------------------------------------
def run(p: Plan, scorer, *, limits: Limits = Limits(), progress: bool = False, config: dict | None = None) -> Output:
    start = time.time()
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        reqs = p.requests(kind)
        if reqs:
            if kind == "loglikelihood_rolling":
                resps = getattr(scorer, kind)([r.arguments[0] for r in reqs])
            else:
                resps = getattr(scorer, kind)([r.arguments for r in reqs])
            for r, x in zip(reqs, resps, strict=True):
                r.resps.append(tuple(x) if kind == "loglikelihood" else x)
    for t in p.tasks:
        for rs in t.requests:
            for r in rs:
                r.filtered = {f.name: metrics.apply_filter(f, r.resps) for f in t.spec.filters}

    verdicts = _run_code(p, limits, progress)
    task_results, samples, configs = {}, {}, {}
    for t in p.tasks:
        raw, logged = defaultdict(list), []
        for f in t.spec.filters:
            for (doc_id, doc), reqs in zip(t.docs, t.requests):
                results = [r.filtered[f.name] for r in reqs]
                m = metrics.process_results(t.spec, doc, results, verdicts)
                logged.append(_sample(t.spec, doc_id, doc, reqs, f.name, m))
                for k, v in m.items():
                    raw[(k, f.name)].append(v)
        agg, n = metrics.aggregate(t.spec, raw)
        task_results[t.spec.name] = {"name": t.spec.name, "alias": t.spec.alias or t.spec.name, "sample_len": n, **agg}
        samples[t.spec.name] = logged
        configs[t.spec.name] = t.spec.config(t.num_fewshot)

    group_results, group_subtasks = _aggregate_groups(p, task_results)
    versions = {t.spec.name: t.spec.version for t in p.tasks} | {g: str(s.version) for g, s in _present_groups(p)}
    n_shot = {t.spec.name: t.num_fewshot for t in p.tasks}
    hib = {t.spec.name: {m.name: m.higher_is_better for m in t.spec.metrics} for t in p.tasks}
    for g, spec in _present_groups(p):  # lm-eval propagates both to groups when the children agree
        leaves = _leaves(g, p)
        shots = {n_shot[x] for x in leaves}
        if len(shots) == 1:
            n_shot[g] = shots.pop()
        merged = {}
        for x in leaves:
            for m, h in hib[x].items():
                merged[m] = h if m not in merged or merged[m] == h else None
        hib[g] = merged
    results = {
        "results": {**task_results, **group_results},
        **({"groups": group_results} if group_results else {}),
        "group_subtasks": group_subtasks,
        "configs": dict(sorted(configs.items())),
        "versions": dict(sorted(versions.items())),
        "n-shot": dict(sorted(n_shot.items())),
        "higher_is_better": dict(sorted(hib.items())),
        "n-samples": {t.spec.name: {"original": t.n_original, "effective": task_results[t.spec.name]["sample_len"]}
                      for t in p.tasks},
        "config": {"limit": None, **(config or {}), "bootstrap_iters": BOOTSTRAP_ITERS, "fewshot_seed": p.seed,
                   **({"skipped_tasks": p.skipped} if p.skipped else {})},
        "date": start,
        "total_evaluation_time_seconds": str(time.time() - start),
    }
    return Output(results, samples)


def _run_code(p: Plan, limits: Limits, progress: bool) -> dict[tuple[str, str], bool]:
    """MBPP: (tests, generation) -> passed, every distinct program once, in the sandbox."""
    programs = {}
    for t in p.tasks:
        if not t.spec.unsafe_code:
            continue
        for f in t.spec.filters:
            for (_, doc), reqs in zip(t.docs, t.requests):
                tests, code = t.spec.doc_to_target(doc), reqs[0].filtered[f.name]
                programs[(tests, code)] = code + "\n" + tests  # code_eval's check program
    if not programs:
        return {}
    verdicts = run_programs(list(programs.values()), limits, progress=progress)
    return {key: v.passed for key, v in zip(programs, verdicts)}


def _present_groups(p: Plan) -> list[tuple[str, GroupSpec]]:
    return [(g.name, g) for g in p.groups if _leaves(g.name, p)]


def _leaves(name: str, p: Plan) -> list[str]:
    ran = {t.spec.name for t in p.tasks}
    groups = {g.name: g for g in p.groups}
    if name in ran:
        return [name]
    if name not in groups:
        return []
    return [x for c in groups[name].children for x in _leaves(c, p)]


def _aggregate_groups(p: Plan, task_results: dict) -> tuple[dict, dict]:
    out, subtasks = {}, {}
    groups = dict(_present_groups(p))
    for name, g in groups.items():  # children before parents (tasks.resolve's order)
        leaves = [task_results[x] for x in _leaves(name, p)]
        res = {"alias": g.alias or g.name, "name": g.name, "sample_len": sum(r["sample_len"] for r in leaves)}
        prefix = f"{g.metric},"
        filters = sorted({k[len(prefix):] for r in leaves for k in r if k.startswith(prefix)})
        counts = {}
        for f in filters:
            key, se = f"{g.metric},{f}", f"{g.metric}_stderr,{f}"
            res |= metrics.aggregate_group(key, se, leaves, g.weight_by_size)
            counts[key] = sum(r["sample_len"] for r in leaves if key in r)
        if counts:
            res["sample_count"] = counts
        out[name] = res
        subtasks[name] = [c for c in g.children if c in groups or c in task_results]
    return out, subtasks


# ---- per-sample records (lm-eval's logged samples and their JSONL form) ---------------------------------------
def _hash(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def _json_default(o):
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, set):
        return list(o)
    return str(o)


def _sample(spec: TaskSpec, doc_id: int, doc: dict, reqs: list[Request], filter_key: str, m: dict) -> dict:
    target = spec.doc_to_target(doc)
    return {
        "doc_id": doc_id, "doc": doc, "target": target,
        "arguments": [r.arguments for r in reqs],
        "resps": [r.resps for r in reqs],
        "filtered_resps": [r.filtered[filter_key] for r in reqs],
        "filter": filter_key, "metrics": list(m),
        "doc_hash": _hash(json.dumps(doc, indent=2, default=_json_default, ensure_ascii=False)),
        "prompt_hash": _hash(reqs[0].arguments[0]),
        "target_hash": _hash(str(target)),
        **m,
    }


def _strings(x):
    """lm-eval's ``sanitize_list``: every leaf as a string, lists and tuples kept."""
    if isinstance(x, list):
        return [_strings(i) for i in x]
    if isinstance(x, tuple):
        return tuple(_strings(i) for i in x)
    return str(x)


def sample_json(sample: dict) -> str:
    """One JSONL line as lm-eval's ``EvaluationTracker.save_results_samples`` writes it."""
    s = dict(sample)
    s["arguments"] = {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)}
                      for i, arg in enumerate(sample["arguments"])}
    s["resps"], s["filtered_resps"] = _strings(sample["resps"]), _strings(sample["filtered_resps"])
    s["target"] = str(sample["target"])
    return json.dumps(s, default=_json_default, ensure_ascii=False)


def write_outputs(out: Output, directory: str | Path) -> list[Path]:
    """``DIR/results.json`` and ``DIR/samples_<task>.jsonl``; returns the paths written."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / "results.json"]
    write_text(paths[0], json.dumps(out.results, indent=2, default=_json_default, ensure_ascii=False) + "\n")
    for task, samples in out.samples.items():
        path = d / f"samples_{task}.jsonl"
        write_text(path, "".join(sample_json(s) + "\n" for s in samples))
        paths.append(path)
    return paths


# ---- the table on stdout ----------------------------------------------------------------------------------------
def _rows_in_order(results: dict) -> list[tuple[str, int]]:
    """(name, depth): each root group, then its children depth-first, then the other tasks."""
    subtasks = results.get("group_subtasks", {})
    children = {c for cs in subtasks.values() for c in cs}
    order, seen = [], set()

    def visit(name, depth):
        if name in seen or name not in results["results"]:
            return
        seen.add(name)
        order.append((name, depth))
        for c in subtasks.get(name, ()):
            visit(c, depth + 1)

    for g in subtasks:
        if g not in children:
            visit(g, 0)
    for name in results["results"]:
        visit(name, 0)
    return order


def markdown_table(results: dict) -> str:
    from .tasks import GROUPS, TASKS

    def ref(name):
        spec = TASKS.get(name) or GROUPS.get(name)
        return spec.reference if spec is not None else None

    order = _rows_in_order(results)
    with_ref = any(ref(n) for n, _ in order)
    head = ["Task"] + (["Gemma 2 2B / 9B / 27B (report)"] if with_ref else []) + \
        ["Filter", "n-shot", "Metric", "Value", "Stderr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, depth in order:
        r = results["results"][name]
        label = " " * depth + ("- " if depth else "") + r.get("alias", name)
        first = True
        for key in sorted(k for k in r if "," in k and "_stderr," not in k):
            metric, _, filt = key.partition(",")
            value, se = r[key], r.get(f"{metric}_stderr,{filt}", "")
            fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
            cells = [label if first else ""] + ([(ref(name) or "") if first else ""] if with_ref else []) + \
                [filt, str(results["n-shot"].get(name, "")) if first else "", metric, fmt(value), fmt(se)]
            lines.append("| " + " | ".join(cells) + " |")
            first = False
    return "\n".join(lines)


def evaluate(scorer, task_names: list[str], data: DataSource, *, num_fewshot: int | None = None,
             limit: float | None = None, limits: Limits = Limits(), progress: bool = False,
             config: dict | None = None) -> Output:
    p = plan(task_names, data, num_fewshot=num_fewshot, limit=limit, progress=progress)
    if p.skipped and progress:
        print(f"gemmaforge eval: no test documents for {len(p.skipped)} MMLU subjects, skipped", file=sys.stderr)
    return run(p, scorer, limits=limits, progress=progress, config={**(config or {}), "limit": limit})
