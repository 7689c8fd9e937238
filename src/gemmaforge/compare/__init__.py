"""Side-by-side comparison of two models with a judge model, in LLM Comparator's format.

``gemmaforge compare --model-a A --model-b B --prompts FILE.jsonl --judge J --out DIR`` writes
``DIR/comparison.json`` (loads in LLM Comparator's web app) and ``DIR/report.html`` (self-contained).
docs/compare.md has the formats, the scale and a measured run.
"""

from .judge import PROMPT, SCALE, Rating, example_score, judge_prompt, parse, rate
from .report import render_html, summarize
from .run import Item, answer, comparison_json, model_judge, read_prompts, write_outputs

__all__ = ["Item", "PROMPT", "Rating", "SCALE", "answer", "comparison_json", "example_score", "judge_prompt",
           "model_judge", "parse", "rate", "read_prompts", "render_html", "summarize", "write_outputs"]
