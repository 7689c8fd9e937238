"""What a ``gemmaforge bench`` report says (benchmark.py runs the variants): the best of a variant's
rounds, and the markdown table: one row per variant, ratios against HF transformers, the CPU line,
every round with ``--rounds``, and the end-to-end times."""

from __future__ import annotations


_HIGHER = ("prefill_tok_s", "decode_tok_s_b")  # key prefixes: the larger the better
_LOWER = ("ttft_ms", "load_s")


def best_of_rounds(runs: list[dict]) -> dict:
    """One variant's rounds -> its best speeds (and the largest peak RSS), with ``per_round`` lists
    of every speed when there was more than one round. A round that failed is left out; all failed:
    the first failure."""
    ok = [r for r in runs if "skipped" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key in out:
        values = [r[key] for r in ok if r.get(key) is not None]
        if not values or not isinstance(values[0], (int, float)):
            continue
        if key.startswith(_HIGHER):
            out[key] = max(values)
        elif key.startswith(_LOWER):
            out[key] = min(values)
        elif key == "peak_rss_mb":
            out[key] = max(values)
    if len(runs) > 1:
        out["per_round"] = {k: [r.get(k) for r in ok] for k in out if k.startswith(_HIGHER)}
        out["rounds_failed"] = len(runs) - len(ok)
    return out


# The pair issue 14 compares: the file as stored, here and in llama.cpp
PAIR = ("gemmaforge:gguf", "llama.cpp:source")


def _rounds(report: dict, bn: str) -> list[str]:
    """With several rounds: every round's speeds, and the pair's ratio round by round (each round
    measures the two within a minute of each other, so their ratio is steadier than the bests')."""
    rows = {r["variant"]: r for r in report["results"] if "per_round" in r}
    if not rows:
        return []
    keys = ("prefill_tok_s", "decode_tok_s_b1", bn)
    out = ["", f"Per round ({report['settings']['rounds']} rounds, variants round-robin):", "",
           "| variant | prefill tok/s | decode b1 tok/s | " + bn.replace("decode_tok_s_", "decode ") + " tok/s |",
           "|---|---|---|---|"]

    def fmt(values):
        return ", ".join("n/a" if v is None else f"{v:.1f}" for v in values) if values else "n/a"

    for name, r in rows.items():
        out.append(f"| {name} | " + " | ".join(fmt(r["per_round"].get(k)) for k in keys) + " |")
    a, b = (rows.get(n) for n in PAIR)
    if a and b:
        for k, label in (("prefill_tok_s", "prefill"), ("decode_tok_s_b1", "decode b1")):
            ra, rb = a["per_round"].get(k) or [], b["per_round"].get(k) or []
            if len(ra) == len(rb) and ra and all(ra) and all(rb):
                out.append(f"- {PAIR[0]} / {PAIR[1]}, {label}, round by round: "
                           + ", ".join(f"{x / y:.2f}x" for x, y in zip(ra, rb)))
    return out


def format_table(report: dict, baseline: str = "hf:fp32") -> str:
    """Markdown table; the ratio columns divide by ``baseline`` (HF transformers, float32)."""
    s = report["settings"]
    bn = f"decode_tok_s_b{s['batch']}"
    base = next((r for r in report["results"] if r["variant"] == baseline and "skipped" not in r), None)

    def num(v, fmt="{:.1f}"):
        return "n/a" if v is None else fmt.format(v)

    def ratio(r, key):
        if base is None or r.get(key) is None or not base.get(key):
            return "n/a"
        return f"{r[key] / base[key]:.2f}x"

    head = (f"| variant | weights | MB | load s | prefill tok/s | TTFT ms | decode b1 tok/s | decode b{s['batch']} tok/s "
            f"| peak RSS MB | perplexity | prefill vs HF | decode b1 vs HF | decode b{s['batch']} vs HF |")
    env = report.get("environment", {})
    lines = [f"CPU: {env.get('cpu', 'unknown')}, {env.get('threads', s['threads'])} threads, torch {env.get('torch')}, "
             f"llama-cpp-python {env.get('llama-cpp-python')}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | skipped: {r['skipped']} |" + " |" * 11)
            continue
        lines.append(
            f"| {r['variant']} | {r['weights']} | {num(r.get('weights_mb'), '{:.0f}')} | {num(r.get('load_s'), '{:.2f}')} "
            f"| {num(r['prefill_tok_s'])} | {num(r['ttft_ms'])} | {num(r['decode_tok_s_b1'])} | {num(r.get(bn))} "
            f"| {num(r.get('peak_rss_mb'), '{:.0f}')} | {num(r.get('perplexity'), '{:.3f}')} "
            f"| {ratio(r, 'prefill_tok_s')} | {ratio(r, 'decode_tok_s_b1')} | {ratio(r, bn)} |"
        )
    lines += _rounds(report, bn)
    e2e = report.get("end_to_end")
    if e2e:
        lines += ["", f"End to end, {e2e['tokens']} greedy tokens, fresh process each run (first / best of runs):", ""]
        for name in ("gemmaforge generate", "llama.cpp"):
            r = e2e.get(name)
            if r is not None:
                lines.append(f"- {name}: " + (r["failed"] if "failed" in r else f"{r['first_s']:.2f} s / {r['best_s']:.2f} s"))
    return "\n".join(lines)
