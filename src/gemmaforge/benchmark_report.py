"""The markdown table of a ``gemmaforge bench`` report (benchmark.py makes the report): one row per
variant, ratios against HF transformers, the CPU line, and the end-to-end times."""

from __future__ import annotations


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
    e2e = report.get("end_to_end")
    if e2e:
        lines += ["", f"End to end, {e2e['tokens']} greedy tokens, fresh process each run (first / best of runs):", ""]
        for name in ("gemmaforge generate", "llama.cpp"):
            r = e2e.get(name)
            if r is not None:
                lines.append(f"- {name}: " + (r["failed"] if "failed" in r else f"{r['first_s']:.2f} s / {r['best_s']:.2f} s"))
    return "\n".join(lines)
