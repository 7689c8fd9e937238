"""Evaluation speed: ``gemmaforge eval``'s harness against lm-eval's HF backend, same model, same data.

    gemmaforge bench eval                      # the embedded Gemma 3 270M, 5-shot MMLU-style, 2 threads
    python bench/eval.py --questions 80 --repeats 3 --out bench-eval.json

One process, both sides on the same weights (gemmaforge's model and its float32 HF export, loaded
once each) and the same documents, run back to back ``--repeats`` times (gemmaforge, lm-eval,
gemmaforge, lm-eval, ...) so that the load of a shared machine falls on both. Each side is timed from
the task to the results (prompts, few-shot blocks, requests, model calls, metrics), the models
already loaded:

- gemmaforge: ``eval.harness.evaluate`` with ``eval.scorer.Scorer``;
- lm-eval: ``lm_eval.evaluator.evaluate`` with ``HFLM`` on the transformers model, lm-eval's own
  ``mmlu_<subject>`` task configs pointed at the same rows (``dataset_path: json``).

The data are MMLU-style (cais/mmlu's columns), generated here: arithmetic questions in two subjects
(``elementary_mathematics``, ``high_school_mathematics``), 5 dev examples each (the 5-shot block, as
MMLU: the first five in order) and ``--questions`` test questions in all. They are not benchmark
data; they give a 5-shot multiple-choice workload of MMLU's shape. Samples/s is documents (questions)
per second; each document is four log-likelihood requests. The report checks that the per-sample
predictions and the task and group accuracies are identical on both sides, and gives the largest
per-choice log-likelihood difference.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch

SUBJECTS = ("elementary_mathematics", "high_school_mathematics")


# ---- data ----------------------------------------------------------------------------------------------------
def _question(rng: random.Random, subject: str) -> tuple[str, list[str], int]:
    if subject == "elementary_mathematics":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice(["+", "-"])
        q, right = (f"What is {a} + {b}?", a + b) if op == "+" else (f"What is {a + b} - {b}?", a)
    else:
        a, b = rng.randint(2, 15), rng.randint(2, 12)
        kind = rng.choice(["product", "square", "linear"])
        if kind == "product":
            q, right = f"What is the product of {a} and {b}?", a * b
        elif kind == "square":
            q, right = f"What is {a} squared?", a * a
        else:
            q, right = f"If {b}x = {a * b}, what is x?", a
    wrong = sorted({right + d for d in (-10, -2, -1, 1, 2, 10)} - {right})
    choices = [right] + rng.sample(wrong, 3)
    rng.shuffle(choices)
    return q, [str(c) for c in choices], choices.index(right)


def make_rows(questions: int, seed: int = 0) -> dict[str, list[dict]]:
    """cais/mmlu rows: {"dev": 5 per subject, "test": ``questions`` split over the subjects}."""
    rng = random.Random(seed)
    out = {"dev": [], "test": []}
    for s_i, subject in enumerate(SUBJECTS):
        n_test = questions // len(SUBJECTS) + (s_i < questions % len(SUBJECTS))
        for split, n in (("dev", 5), ("test", n_test)):
            for _ in range(n):
                q, choices, answer = _question(rng, subject)
                out[split].append({"question": q, "subject": subject, "choices": choices, "answer": answer})
    return out


def write_data(root: Path, questions: int, seed: int = 0) -> dict[str, dict[str, str]]:
    """gemmaforge's layout (root/mmlu/SPLIT.jsonl, every subject in one file) and lm-eval's per-subject
    files (root/lm/mmlu_SUBJECT/SPLIT.jsonl); returns lm-eval's {task: {split: file}}."""
    rows = make_rows(questions, seed)
    files: dict[str, dict[str, str]] = {}

    def write(path: Path, rs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rs), encoding="utf-8")
        return str(path)

    for split, rs in rows.items():
        write(root / "mmlu" / f"{split}.jsonl", rs)
        for subject in SUBJECTS:
            files.setdefault(f"mmlu_{subject}", {})[split] = write(
                root / "lm" / f"mmlu_{subject}" / f"{split}.jsonl", [r for r in rs if r["subject"] == subject])
    return files


# ---- lm-eval's side ----------------------------------------------------------------------------------------------
def lm_eval_tasks(files: dict[str, dict[str, str]], cache_dir: Path, num_fewshot: int) -> dict:
    """lm-eval's own mmlu_SUBJECT configs on local files, and its mmlu group (size-weighted acc)."""
    from lm_eval.api.group import Group
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.config.group import AggMetricConfig
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    tasks = {}
    for name, data_files in files.items():
        cfg = tm._factory._load_full_config(tm._entry(name), {
            "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files, "cache_dir": str(cache_dir)}})
        for key in ("tag", "group", "task_list"):
            cfg.pop(key, None)
        task = ConfigurableTask(config=cfg)
        task.set_config("num_fewshot", num_fewshot)
        task.set_fewshot_seed(1234)
        tasks[name] = task
    stem = Group("mmlu_stem", alias="stem", aggregate_metric_list=[AggMetricConfig(metric="acc", weight_by_size=True)],
                 metadata={"version": 2})
    for t in tasks.values():
        stem.add(t)
    top = Group("mmlu", aggregate_metric_list=[AggMetricConfig(metric="acc", weight_by_size=True)],
                metadata={"version": 2})
    top.add(stem)
    return {"tasks": tasks, "groups": {"mmlu_stem": stem, "mmlu": top}}


# ---- the benchmark ---------------------------------------------------------------------------------------------
def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _hf_pair(source, workdir: Path, model):
    """The transformers twin of ``model`` (float32, eager attention as the agreement tests) and HF's
    tokenizer for the same vocabulary."""
    import transformers

    from ..checkpoint.hf import save_pretrained

    hf_dir = workdir / "hf"
    if not (hf_dir / "config.json").exists():
        save_pretrained(model, hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    if source is None:
        from ..default_model import default_model_path

        source = default_model_path()
    src = Path(str(source))
    if src.is_file() and src.suffix == ".gguf":
        tok = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    else:
        tok = transformers.AutoTokenizer.from_pretrained(str(src))
    return hf, tok


def run_benchmark(source=None, *, questions: int = 80, num_fewshot: int = 5, batch_size: int = 16,
                  threads: int = 2, repeats: int = 2, workdir: Path | None = None, model=None, tokenizer=None,
                  hf_model=None, hf_tokenizer=None, max_length: int | None = None, progress: bool = False) -> dict:
    """Both sides ``repeats`` times, interleaved; the report (``format_report`` prints it)."""
    import tempfile

    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.models.huggingface import HFLM

    import gemmaforge

    from . import harness
    from .data import DataSource
    from .scorer import Scorer

    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix="gemmaforge-bench-eval-")
    root = Path(tmp.name)
    workdir = Path(workdir) if workdir else root
    files = write_data(root / "data", questions)
    if model is None:
        model = gemmaforge.load(source, dtype=torch.float32)
    if tokenizer is None:
        tokenizer = gemmaforge.load_tokenizer(source)
    if hf_model is None:
        hf_model, hf_tokenizer = _hf_pair(source, workdir, model)
    max_length = max_length or min(model.config.max_position_embeddings, 2048)
    names = list(files)
    scorer = Scorer(model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress)
    hflm = HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=batch_size, max_length=max_length)
    data = DataSource(root / "data")

    runs = {"gemmaforge": [], "lm-eval HF": []}
    ours = theirs = None
    loads = [_load_avg()]
    for _ in range(repeats):
        t = time.perf_counter()
        ours = harness.evaluate(scorer, ["mmlu"], data, num_fewshot=num_fewshot)  # absent subjects skipped
        runs["gemmaforge"].append(time.perf_counter() - t)
        tasks = lm_eval_tasks(files, root / "hf_cache", num_fewshot)  # its datasets load untimed
        t = time.perf_counter()
        theirs = lm_evaluate(hflm, tasks, log_samples=True, verbosity="ERROR")
        runs["lm-eval HF"].append(time.perf_counter() - t)
        loads.append(_load_avg())

    n_docs = sum(len(ours.samples[n]) for n in names)
    same_predictions, worst = True, 0.0
    for n in names:
        for a, b in zip(ours.samples[n], theirs["samples"][n], strict=True):
            la, lb = [x for x, _ in a["filtered_resps"]], [x for x, _ in b["filtered_resps"]]
            worst = max(worst, max(abs(x - y) for x, y in zip(la, lb)))
            same_predictions &= a["acc"] == b["acc"] and a["arguments"] == [tuple(x) for x in b["arguments"]]
    scores = {side: {n: r["acc,none"] for n, r in sorted(res["results"].items()) if "acc,none" in r}
              for side, res in (("gemmaforge", ours.results), ("lm-eval HF", theirs))}
    best = {k: min(v) for k, v in runs.items()}
    from ..benchmark import environment

    report = {
        "task": f"mmlu-style, {num_fewshot}-shot, {len(names)} subjects", "documents": n_docs,
        "loglikelihood_requests": 4 * n_docs, "batch_size": batch_size, "threads": threads,
        "max_length": max_length, "repeats": repeats,
        "seconds": runs, "samples_per_s": {k: n_docs / v for k, v in best.items()},
        "samples_per_s_each_run": {k: [n_docs / x for x in v] for k, v in runs.items()},
        "ratio": best["lm-eval HF"] / best["gemmaforge"],
        "ratio_each_run": [b / a for a, b in zip(runs["gemmaforge"], runs["lm-eval HF"])],
        "scores": scores, "identical_scores": scores["gemmaforge"] == scores["lm-eval HF"] and same_predictions,
        "identical_predictions": same_predictions, "max_loglikelihood_difference": worst,
        "load_average": loads, "environment": environment(threads),
    }
    tmp.cleanup()
    return report


def format_report(r: dict) -> str:
    sps, g, h = r["samples_per_s"], "gemmaforge", "lm-eval HF"
    lines = [f"{r['task']}: {r['documents']} documents ({r['loglikelihood_requests']} log-likelihood requests), "
             f"batch {r['batch_size']}, {r['threads']} threads, best of {r['repeats']}",
             "", "| side | samples/s (best) | samples/s each run | seconds each run |", "|---|---|---|---|"]
    for side in (g, h):
        lines.append(f"| {side} | {sps[side]:.2f} | {', '.join(f'{x:.2f}' for x in r['samples_per_s_each_run'][side])}"
                     f" | {', '.join(f'{x:.1f}' for x in r['seconds'][side])} |")
    lines += ["", f"ratio (gemmaforge / lm-eval HF samples/s): {r['ratio']:.2f}x best, "
              f"each run {', '.join(f'{x:.2f}x' for x in r['ratio_each_run'])}",
              "acc: " + ", ".join(f"{k} {v:.4f}" for k, v in r["scores"][g].items()),
              f"identical scores and per-sample predictions: {'yes' if r['identical_scores'] else 'NO'} "
              f"(max per-choice log-likelihood difference {r['max_loglikelihood_difference']:.2e})",
              f"load average (1/5/15 min) before and after each repeat: {r['load_average']}",
              f"cpu: {r['environment']['cpu']}"]
    return "\n".join(lines)


# ---- `gemmaforge bench eval` ---------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file or preset name (default: the embedded Gemma 3 270M)")
    p.add_argument("--questions", type=int, default=80, help="MMLU-style test questions (default %(default)s)")
    p.add_argument("--num-fewshot", type=int, default=5, help="few-shot examples (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="both sides' batch size (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each side, best kept (default %(default)s)")
    p.add_argument("--workdir", default=None, help="where the HF export is kept between runs (default: a temp dir)")
    p.add_argument("--out", default="bench-eval.json", help="JSON report path (default %(default)s)")


def run(args) -> int:
    from ..errors import GemmaforgeError

    for flag in ("questions", "batch_size", "threads", "repeats"):
        if getattr(args, flag) < 1:
            raise GemmaforgeError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    if not 0 <= args.num_fewshot <= 5:
        raise GemmaforgeError(f"--num-fewshot {args.num_fewshot}: the data have 5 dev examples per subject (0-5)")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise GemmaforgeError("gemmaforge bench eval needs lm-eval: pip install 'gemmaforge[eval]'") from None
    report = run_benchmark(args.model, questions=args.questions, num_fewshot=args.num_fewshot,
                           batch_size=args.batch_size, threads=args.threads, repeats=args.repeats,
                           workdir=Path(args.workdir) if args.workdir else None)
    print(format_report(report))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if report["identical_scores"] else 1
