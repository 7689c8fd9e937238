"""Numbers and the HTML report of a comparison, from LLM Comparator's JSON (``examples``).

The outcome rules are LLM Comparator's web app's, so the two agree on the same file: an example is
a win for A when its score is above +0.25 (its ``DEFAULT_WIN_RATE_THRESHOLD``), for B below -0.25,
a tie in between, unknown without a score; A's win rate counts a tie as half a win. The histogram
has the app's 7 bins of width 0.5 on [-1.75, 1.75] (the middle bin, [-0.25, 0.25], is the ties).

The HTML is one file with inline CSS and SVG, no script and no external resource, so it opens
offline and anywhere. Numbers carry ids (``win-rate``, ``count-a``, ...) for tests and scrapers.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from ..stats import wilson

WIN_THRESHOLD = 0.25
BIN_EDGES = [-1.75, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 1.75]
BIN_LABELS = ["B much better", "B better", "B slightly better", "same", "A slightly better", "A better",
              "A much better"]


def outcome(score: float | None) -> str:
    if score is None:
        return "unknown"
    if score > WIN_THRESHOLD:
        return "a"
    if score < -WIN_THRESHOLD:
        return "b"
    return "tie"


def histogram_bin(score: float) -> int:
    """The app's diverging bins: [l, r) left of the middle, (l, r] right of it, [-0.25, 0.25] middle."""
    pos = (score - BIN_EDGES[0]) / 0.5
    i = math.ceil(pos) - 1 if pos > 3.5 else math.floor(pos)
    return min(max(i, 0), 6)


def slice_stats(examples: Sequence[dict]) -> dict:
    counts = {"a": 0, "b": 0, "tie": 0, "unknown": 0}
    scores = []
    for ex in examples:
        counts[outcome(ex["score"])] += 1
        if ex["score"] is not None:
            scores.append(ex["score"])
    n = counts["a"] + counts["b"] + counts["tie"]
    wins = counts["a"] + 0.5 * counts["tie"]
    mean = sum(scores) / len(scores) if scores else None
    if len(scores) > 1:
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))
        half = 1.96 * sd / math.sqrt(len(scores))
        mean_ci = [mean - half, mean + half]
    else:
        mean_ci = None
    return {"examples": len(examples), "counts": counts, "win_rate_a": wins / n if n else None,
            "win_rate_a_95ci": list(wilson(wins, n)) if n else None, "mean_score": mean, "mean_score_95ci": mean_ci}


def summarize(data: dict, top: int = 5) -> dict:
    """Everything the report shows, from the LLM Comparator JSON."""
    examples = data["examples"]
    out = slice_stats(examples)
    hist = [0] * 7
    for ex in examples:
        if ex["score"] is not None:
            hist[histogram_bin(ex["score"])] += 1
    out["histogram"] = hist
    ratings = [r for ex in examples for r in ex["individual_rater_scores"]]
    out["ratings"] = len(ratings)
    out["unparsable_ratings"] = sum(r["score"] is None for r in ratings)
    # Position bias: the mean score of the ratings that saw A first vs those that saw B first.
    first = [r["score"] for r in ratings if r["score"] is not None and not r["is_flipped"]]
    second = [r["score"] for r in ratings if r["score"] is not None and r["is_flipped"]]
    out["mean_score_a_shown_first"] = sum(first) / len(first) if first else None
    out["mean_score_b_shown_first"] = sum(second) / len(second) if second else None
    tags = sorted({t for ex in examples for t in ex["tags"]})
    out["tags"] = {t: slice_stats([ex for ex in examples if t in ex["tags"]]) for t in tags}
    out["disagreements"] = _disagreements(examples, top)
    return out


def _disagreements(examples, top):
    """Examples whose two ratings (A first, B first) differ most, largest gap first."""
    rows = []
    for i, ex in enumerate(examples):
        s = [r["score"] for r in ex["individual_rater_scores"] if r["score"] is not None]
        if len(s) >= 2:
            rows.append((max(s) - min(s), i))
    rows.sort(key=lambda x: (-x[0], x[1]))
    return [{"index": i, "gap": gap} for gap, i in rows[:top] if gap > 0]


# ---- HTML -----------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1f2328;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a}.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{border:1px solid #d0d7de;border-radius:8px;padding:10px 14px;min-width:150px}
.card .v{font-size:24px;font-weight:600}.card .l{color:#57606a;font-size:12px}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #e5e8eb;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ex{border:1px solid #d0d7de;border-radius:8px;margin:12px 0;padding:10px 14px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}.pair pre,.prompt{white-space:pre-wrap;word-break:break-word;
background:#f6f8fa;border-radius:6px;padding:8px;margin:4px 0;font:12.5px/1.4 ui-monospace,Menlo,Consolas,monospace;max-height:260px;overflow:auto}
.a{color:#0969da}.b{color:#bc4c00}.muted{color:#57606a}.bar-a{fill:#0969da}.bar-b{fill:#bc4c00}.bar-t{fill:#8c959f}
"""


def _f(x, digits=3, pct=False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:+.{digits}f}" if digits else str(x)


def _histogram_svg(hist) -> str:
    w, h, pad, bw = 640, 220, 30, 80
    top = max(hist) or 1
    parts = [f'<svg id="histogram" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 60}" '
             f'viewBox="0 0 {w} {h + 60}" role="img" aria-label="score histogram">']
    for i, c in enumerate(hist):
        x = pad + i * bw
        bh = (h - 30) * c / top
        cls = "bar-b" if i < 3 else "bar-a" if i > 3 else "bar-t"
        parts.append(f'<rect class="{cls}" x="{x + 8}" y="{h - bh:.1f}" width="{bw - 16}" height="{bh:.1f}"/>')
        parts.append(f'<text class="count" data-bin="{i}" x="{x + bw / 2}" y="{h - bh - 5:.1f}" '
                     f'text-anchor="middle" font-size="13">{c}</text>')
        words = BIN_LABELS[i].split(" ", 1)
        for k, word in enumerate(words):
            parts.append(f'<text x="{x + bw / 2}" y="{h + 18 + 14 * k}" text-anchor="middle" font-size="11" '
                         f'fill="#57606a">{html.escape(word)}</text>')
    parts.append(f'<line x1="{pad}" y1="{h}" x2="{pad + 7 * bw}" y2="{h}" stroke="#8c959f"/></svg>')
    return "".join(parts)


def render_html(data: dict, summary: dict) -> str:
    e = html.escape
    meta = data["metadata"].get("gemmaforge", {})
    a, b = (m["name"] for m in data["models"])
    s, c = summary, summary["counts"]
    ci = s["win_rate_a_95ci"]
    ci_text = f"{100 * ci[0]:.1f}% – {100 * ci[1]:.1f}%" if ci else "n/a"
    mci = s["mean_score_95ci"]
    cards = [
        ("win-rate", _f(s["win_rate_a"], pct=True), f"A's win rate (ties = ½); 95% CI <span id=\"win-rate-ci\">{ci_text}</span>"),
        ("mean-score", _f(s["mean_score"]), "mean score (+ = A better)" + (
            f"; 95% CI {mci[0]:+.3f} – {mci[1]:+.3f}" if mci else "")),
        ("n-examples", str(s["examples"]), "examples"),
        ("count-a", str(c["a"]), "A wins"), ("count-b", str(c["b"]), "B wins"),
        ("count-tie", str(c["tie"]), "ties"), ("count-unknown", str(c["unknown"]), "no parsable rating"),
        ("unparsable", f"{s['unparsable_ratings']}/{s['ratings']}", "unparsable judge answers"),
    ]
    out = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>{e(a)} vs {e(b)}: side-by-side comparison</title><style>{CSS}</style></head><body>",
           f"<h1><span class=\"a\">A: {e(a)}</span> vs <span class=\"b\">B: {e(b)}</span></h1>",
           f"<div class=\"sub\">judge: {e(str(meta.get('judge', '?')))}; each pair rated twice, positions swapped "
           f"(LLM Comparator's 7-point scale, +1.5 = A much better … −1.5 = B much better); a score above "
           f"+{WIN_THRESHOLD} is a win for A, below −{WIN_THRESHOLD} for B.</div>", "<div class=\"cards\">"]
    for id_, value, label in cards:
        out.append(f"<div class=\"card\"><div class=\"v\" id=\"{id_}\">{value}</div><div class=\"l\">{label}</div></div>")
    out.append("</div>")
    first, second = s["mean_score_a_shown_first"], s["mean_score_b_shown_first"]
    out.append(f"<p class=\"muted\">Position bias check: mean score when A was shown first "
               f"<span id=\"score-a-first\">{_f(first)}</span>, when B was shown first "
               f"<span id=\"score-b-first\">{_f(second)}</span> (equal for a judge without position bias).</p>")
    out += ["<h2>Score histogram</h2>", _histogram_svg(s["histogram"])]
    out.append("<h2>By tag</h2>")
    if s["tags"]:
        out.append("<table id=\"tags\"><tr><th>tag</th><th>examples</th><th>A wins</th><th>B wins</th><th>ties</th>"
                   "<th>unknown</th><th>A's win rate (95% CI)</th><th>mean score</th></tr>")
        for tag, t in s["tags"].items():
            tc, tci = t["counts"], t["win_rate_a_95ci"]
            rate = _f(t["win_rate_a"], pct=True) + (f" ({100 * tci[0]:.0f}–{100 * tci[1]:.0f}%)" if tci else "")
            out.append(f"<tr data-tag=\"{e(tag)}\"><td>{e(tag)}</td><td class=\"n\">{t['examples']}</td>"
                       f"<td class=\"n\">{tc['a']}</td><td class=\"n\">{tc['b']}</td><td class=\"n\">{tc['tie']}</td>"
                       f"<td class=\"n\">{tc['unknown']}</td><td class=\"n win\">{rate}</td>"
                       f"<td class=\"n\">{_f(t['mean_score'])}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p class=\"muted\">No tags in the prompts file.</p>")
    out.append("<h2>Largest disagreements between the two orders</h2>")
    if not s["disagreements"]:
        out.append("<p class=\"muted\">None: every example's two ratings agree (or fewer than two parsed).</p>")
    for d in s["disagreements"]:
        ex = data["examples"][d["index"]]
        out.append(f"<div class=\"ex\" data-index=\"{d['index']}\"><b>Example {d['index']}</b> "
                   f"<span class=\"muted\">score {ex['score']:+.2f}; the two ratings differ by {d['gap']:.2f}"
                   f"{'; tags: ' + e(', '.join(ex['tags'])) if ex['tags'] else ''}</span>"
                   f"<div class=\"prompt\">{e(ex['input_text'])}</div><div class=\"pair\">"
                   f"<div><b class=\"a\">A</b><pre>{e(ex['output_text_a'])}</pre></div>"
                   f"<div><b class=\"b\">B</b><pre>{e(ex['output_text_b'])}</pre></div></div><ul>")
        for r in ex["individual_rater_scores"]:
            order = "B shown first (the judge's “A” is B)" if r["is_flipped"] else "A shown first"
            verdict = "unparsable" if r["score"] is None else f"“{e(r['rating_label'])}” → {r['score']:+.1f} for A"
            out.append(f"<li>{order}: {verdict}. <span class=\"muted\">{e(r['rationale'] or '')}</span></li>")
        out.append("</ul></div>")
    out.append(f"<p class=\"muted\">gemmaforge compare; LLM Comparator JSON: comparison.json "
               f"({len(data['examples'])} examples).</p></body></html>\n")
    return "".join(out)
