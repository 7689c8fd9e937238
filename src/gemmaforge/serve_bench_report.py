"""The serving benchmark's report (serve_bench.py runs the load): the issue's goals, and the markdown
table with every level's ratios to llama-server at the same concurrency (docs/benchmarks.md)."""

from __future__ import annotations

BASELINE = "llama-server"  # the ratios' denominator


def _level(report: dict, target: str, c: int) -> dict | None:
    for t in report["targets"]:
        if t["target"] == target and t["status"] == "ok":
            return next((lv for lv in t["levels"] if lv["concurrency"] == c and lv["ok"]), None)
    return None


def goals(report: dict) -> dict:
    """The issue's targets: at 8 streams >= 1.5x llama-server's output tok/s with p99 TTFT no worse;
    at 1 stream within 10% of the Engine's own decode speed."""
    out = {}
    ours, base = _level(report, "gemmaforge", 8), _level(report, BASELINE, 8)
    if ours and base:
        ratio = ours["out_tok_s"] / base["out_tok_s"]
        ttft = ours["ttft_p99_ms"] / base["ttft_p99_ms"]
        out["c8"] = {"out_tok_s_ratio": ratio, "ttft_p99_ratio": ttft, "met": ratio >= 1.5 and ttft <= 1.0}
    one, ref = _level(report, "gemmaforge", 1), report.get("reference") or {}
    if one and ref.get("decode_tok_s") and one.get("decode_tok_s_per_stream"):
        ratio = one["decode_tok_s_per_stream"] / ref["decode_tok_s"]
        out["c1"] = {"decode_ratio": ratio, "out_tok_s_ratio": one["out_tok_s"] / ref["decode_tok_s"],
                     "met": ratio >= 0.9}
    return out


def _num(v, fmt="{:.1f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _short(level: dict) -> str:
    return f" ({level['short']} short)" if level.get("short") else ""


def format_table(report: dict) -> str:
    """Markdown: one row per target and level; ratios divide by llama-server at the same level."""
    head = ("| target | C | ok/requests | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
            "| decode tok/s/stream | peak RSS MB | out tok/s vs llama-server | TTFT p99 vs llama-server |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for t in report["targets"]:
        for lv in t["levels"]:
            base = _level(report, BASELINE, lv["concurrency"])
            tok = "n/a" if not (base and lv["ok"]) else f"{lv['out_tok_s'] / base['out_tok_s']:.2f}x"
            ttft = ("n/a" if not (base and lv["ok"] and base["ttft_p99_ms"])
                    else f"{lv['ttft_p99_ms'] / base['ttft_p99_ms']:.2f}x")
            lines.append(
                f"| {t['target']} | {lv['concurrency']} | {lv['ok']}/{lv['requests']}{_short(lv)} | {_num(lv['req_s'], '{:.2f}')} "
                f"| {_num(lv['out_tok_s'])} | {_num(lv['ttft_p50_ms'], '{:.0f}')} | {_num(lv['ttft_p99_ms'], '{:.0f}')} "
                f"| {_num(lv['itl_p50_ms'])} | {_num(lv['itl_p99_ms'])} | {_num(lv['decode_tok_s_per_stream'])} "
                f"| {_num(lv['peak_rss_mb'], '{:.0f}')} | {tok} | {ttft} |")
        if t["status"] != "ok":
            lines.append(f"| {t['target']} | - | {t['status']} |" + " |" * 10)
    return "\n".join(lines)


def format_summary(report: dict) -> str:
    """The machine, the reference and the issue's two goals, as lines under the table."""
    env, s = report["environment"], report["settings"]
    lines = [f"CPU: {env['cpu']}, {s['threads']} threads; gemmaforge --quant {s['quant']}; "
             f"{s['requests']} requests per level, prompts {s['prompt_tokens'][0]}-{s['prompt_tokens'][1]} tokens, "
             f"outputs {s['output_tokens'][0]}-{s['output_tokens'][1]} tokens"]
    ref = report.get("reference")
    if ref:
        lines.append(f"gemmaforge Engine reference (batch 1, {ref['prompt_len']}-token prompt, {ref['new_tokens']} new): "
                     + (f"decode {ref['decode_tok_s']:.1f} tok/s" if "decode_tok_s" in ref else ref["error"]))
    g = report.get("goals", {})
    if "c8" in g:
        lines.append(f"goal C=8: out tok/s {g['c8']['out_tok_s_ratio']:.2f}x llama-server (>= 1.5x), TTFT p99 "
                     f"{g['c8']['ttft_p99_ratio']:.2f}x (<= 1.0x): {'met' if g['c8']['met'] else 'not met'}")
    if "c1" in g:
        lines.append(f"goal C=1: decode tok/s per stream {g['c1']['decode_ratio']:.2f}x the Engine's (>= 0.90x; "
                     f"out tok/s incl. prefill {g['c1']['out_tok_s_ratio']:.2f}x): {'met' if g['c1']['met'] else 'not met'}")
    return "\n".join(lines)

