"""``gemmaforge compare``: both models answer every prompt, a judge model rates each pair twice.

    prompts (JSONL) -> answers of A (Engine A) -> answers of B (Engine B) -> judge (Engine J)
                    -> DIR/comparison.json (LLM Comparator's format) + DIR/report.html

Every model is an ordinary ``gemmaforge.load`` source run through its own ``Engine`` and
``gemmaforge.generate``, loaded one after the other and freed after its part, so three models
never sit in memory together.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_text
from ..errors import GemmaforgeError
from .judge import PREFILL, STOP, example_score, rate
from .report import render_html, summarize

EMBEDDED = "embedded"  # names the embedded Gemma 3 270M where a source is required


@dataclass
class Item:
    prompt: str
    tags: list[str] = field(default_factory=list)


def read_prompts(path: str | Path) -> list[Item]:
    """JSONL, one ``{"prompt": "...", "tags": ["..."]}`` per line (``tags`` optional; blank lines
    skipped). Any other shape is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise GemmaforgeError(f"prompts file {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise GemmaforgeError(f"prompts file {path} is not UTF-8 text") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"prompts file {path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GemmaforgeError(f"{where} is not JSON ({e.msg}): write one "
                                  '{"prompt": "...", "tags": [...]} object per line') from None
        if not isinstance(row, dict):
            raise GemmaforgeError(f"{where}: expected an object like {{\"prompt\": \"...\"}}, got {type(row).__name__}")
        unknown = sorted(set(row) - {"prompt", "tags"})
        if unknown:
            raise GemmaforgeError(f"{where}: unknown field {unknown[0]!r} (the fields are 'prompt' and 'tags')")
        prompt, tags = row.get("prompt"), row.get("tags", [])
        if not isinstance(prompt, str) or not prompt.strip():
            raise GemmaforgeError(f"{where}: 'prompt' must be a non-empty string")
        if isinstance(tags, str):
            tags = [tags]
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise GemmaforgeError(f"{where}: 'tags' must be a list of non-empty strings")
        items.append(Item(prompt, list(dict.fromkeys(tags))))
    if not items:
        raise GemmaforgeError(f"prompts file {path} has no prompts: write one {{\"prompt\": \"...\"}} object per line")
    return items


def _model_args(args, source: str, quant: str) -> argparse.Namespace:
    """The generate command's model flags for one side (so loading, --quant and --compile behave
    as in ``gemmaforge generate``)."""
    return argparse.Namespace(model=None if source == EMBEDDED else source, tokenizer=None, dtype=args.dtype,
                              device=args.device, quant=quant, activations="auto", compile=args.compile)


def _load(args, source: str, quant: str, new_tokens: int):
    from ..commands.generate import load_model_and_tokenizer, make_engine

    margs = _model_args(args, source, quant)
    model, tokenizer = load_model_and_tokenizer(margs)
    return make_engine(model, margs, new_tokens=new_tokens), tokenizer


def _log(text: str) -> None:
    print(f"gemmaforge: {text}", file=sys.stderr, flush=True)


def answer(engine, tokenizer, prompts: list[str], params, batch_size: int) -> list[str]:
    """Each prompt as one user turn of the chat template, ``batch_size`` at a time."""
    import dataclasses

    from ..generation.api import generate

    out = []
    for start in range(0, len(prompts), batch_size):
        # Row i of the whole run gets seed + i wherever its batch starts (reproducible per prompt).
        p = params if params.seed is None else dataclasses.replace(params, seed=params.seed + start)
        out += generate(engine, tokenizer, prompts[start:start + batch_size], chat=True, params=p)
    return out


def model_judge(engine, tokenizer, params, batch_size: int, retry_temperature: float = 0.7):
    """The judge function of ``judge.rate`` over a model: the judge prompt as a user turn, the reply
    started with ``<result><explanation>`` and stopped at ``</result>``. Attempt 0 uses ``params``
    (greedy by default); a retry samples (a greedy retry would give the same answer), seeded by the
    attempt so a run is reproducible."""
    import dataclasses

    from ..chat import BOS, format_chat
    from ..generation.api import generate

    def run(prompts, attempt):
        p = dataclasses.replace(params, stop=(STOP,))
        if attempt:
            p = dataclasses.replace(p, temperature=max(params.temperature, retry_temperature),
                                    seed=(params.seed or 0) + 1000 * attempt)
        # The chat prompt plus the start of the reply, as text: generate() adds the one <bos>.
        texts = [format_chat([{"role": "user", "content": q}])[len(BOS):] + PREFILL for q in prompts]
        out = []
        for start in range(0, len(texts), batch_size):
            out += [PREFILL + t for t in generate(engine, tokenizer, texts[start:start + batch_size], params=p)]
        return out

    return run


def comparison_json(items, answers_a, answers_b, ratings, names, meta) -> dict:
    """LLM Comparator's input file (its python package's ``comparison.run`` output shape)."""
    examples = []
    for item, a, b, rs in zip(items, answers_a, answers_b, ratings):
        examples.append({"input_text": item.prompt, "tags": item.tags, "output_text_a": a, "output_text_b": b,
                         "score": example_score(rs), "individual_rater_scores": [r.as_json() for r in rs],
                         "rationale_list": [], "custom_fields": {}})
    return {"metadata": {"source_path": "", "custom_fields_schema": [], "gemmaforge": meta},
            "models": [{"name": n} for n in names], "examples": examples, "rationale_clusters": []}


def write_outputs(out: str | Path, data: dict) -> dict:
    """comparison.json and report.html under ``out``, each written atomically; returns the summary."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GemmaforgeError(f"--out {out} is a file: give a directory")
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(data)
    data["metadata"]["gemmaforge"]["summary"] = {k: v for k, v in summary.items() if k != "disagreements"}
    write_text(out / "comparison.json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    write_text(out / "report.html", render_html(data, summary))
    return summary


def run_compare(args) -> int:
    from ..generation.sampling import SamplingParams

    items = read_prompts(args.prompts)  # bad input fails before any model loads
    if args.batch_size < 1 or args.retries < 0:
        raise GemmaforgeError(f"--batch-size {args.batch_size} / --retries {args.retries}: need >= 1 / >= 0")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise GemmaforgeError(f"--out {out} is a file: give a directory")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                            max_new_tokens=args.max_new_tokens)
    judge_params = SamplingParams(temperature=args.judge_temperature, seed=args.seed,
                                  max_new_tokens=args.judge_max_new_tokens)
    prompts = [it.prompt for it in items]
    t0 = time.time()
    answers = {}
    for side, source, quant in (("A", args.model_a, args.quant_a), ("B", args.model_b, args.quant_b)):
        engine, tok = _load(args, source, quant, len(items) * args.max_new_tokens)
        answers[side] = answer(engine, tok, prompts, params, args.batch_size)
        _log(f"model {side} ({_name(source, quant)}) answered {len(items)} prompts ({time.time() - t0:.0f} s)")
        del engine, tok
        gc.collect()
    engine, tok = _load(args, args.judge, args.judge_quant, 2 * len(items) * args.judge_max_new_tokens)
    judge = model_judge(engine, tok, judge_params, args.batch_size)
    ratings = rate(list(zip(prompts, answers["A"], answers["B"])), judge, retries=args.retries)
    del engine, tok
    names = [args.name_a or _name(args.model_a, args.quant_a), args.name_b or _name(args.model_b, args.quant_b)]
    meta = {"judge": _name(args.judge, args.judge_quant), "prompts_file": str(args.prompts),
            "sampling": {"temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
                         "max_new_tokens": args.max_new_tokens},
            "judge_sampling": {"temperature": args.judge_temperature, "max_new_tokens": args.judge_max_new_tokens,
                               "retries": args.retries},
            "win_threshold": 0.25, "seconds": round(time.time() - t0, 1)}
    data = comparison_json(items, answers["A"], answers["B"], ratings, names, meta)
    s = write_outputs(out, data)
    c = s["counts"]
    rate_a = "n/a" if s["win_rate_a"] is None else f"{100 * s['win_rate_a']:.1f}%"
    ci = s["win_rate_a_95ci"]
    print(f"A ({names[0]}) vs B ({names[1]}): A's win rate {rate_a}"
          + (f" (95% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%)" if ci else "")
          + f"; A {c['a']}, B {c['b']}, tie {c['tie']}, unknown {c['unknown']}; "
          f"unparsable judge answers {s['unparsable_ratings']}/{s['ratings']}; wrote {out}/comparison.json and "
          f"{out}/report.html")
    return 0


def _name(source: str, quant: str) -> str:
    base = "gemma3-270m (embedded)" if source == EMBEDDED else Path(source).name or str(source)
    return base if quant == "auto" else f"{base} --quant {quant}"
