"""The judge: a model asked which of two answers is better, on LLM Comparator's 7-point scale.

The XML answer format (``<result><explanation>..</explanation><verdict>..</verdict></result>``)
and the label -> score map are those of LLM Comparator's ``llm_judge_runner``
(PAIR-code/llm-comparator), so the scores mean what they mean in its web app: positive = A better,
1.5 = "A is much better", 0 = "same".

Each pair is rated twice, once with the answers swapped; a swapped rating's score is negated back
to the A/B order before the two are averaged (a judge that prefers whatever it reads first then
averages to 0). An answer without a known ``<verdict>`` is asked again (``retries`` times, sampled:
a greedy judge would repeat itself) and, if still unparsable, recorded with ``score: null`` and
its raw text, never dropped: the report counts them.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# LLM Comparator's DEFAULT_RATING_TO_SCORE_MAP.
SCALE = {
    "A is much better": 1.5,
    "A is better": 1.0,
    "A is slightly better": 0.5,
    "same": 0.0,
    "B is slightly better": -0.5,
    "B is better": -1.0,
    "B is much better": -1.5,
}

# Our wording; the answer format (the XML tags) and the seven labels are LLM Comparator's, so its
# parser and ours read the same answers.
PROMPT = """You are judging two answers to the same user request. Decide which one answers it better.

Things to weigh: whether the answer does what was asked and covers the main points; whether it is
clear and free of filler; creativity when the request is creative; factual accuracy; and safety (no
harmful, dangerous or sexually explicit content, and a refusal when the request asks for such content).

Reply in exactly this XML format:

<result>
  <explanation>Two or three sentences comparing the answers.</explanation>
  <verdict>A is slightly better</verdict>
</result>

The verdict is a 7-point scale and must be exactly one of:
'A is much better', 'A is better', 'A is slightly better', 'same', 'B is slightly better', 'B is better', 'B is much better'.

[User request]
{prompt}

[Response A]
{response_a}
[End of Response A]

[Response B]
{response_b}
[End of Response B]

Your judgement in the XML format above:
"""

# The judge's reply is started for it (a small model then keeps to the format far more often).
PREFILL = "<result>\n  <explanation>"
STOP = "</result>"

_VERDICT = re.compile(r"<verdict>\s*(.*?)\s*</verdict>", re.S | re.I)
_EXPLANATION = re.compile(r"<explanation>\s*(.*?)\s*</explanation>", re.S | re.I)
_LABELS = {k.lower(): k for k in SCALE}


def judge_prompt(prompt: str, response_a: str, response_b: str) -> str:
    return PROMPT.format(prompt=prompt, response_a=response_a, response_b=response_b)


def parse(raw: str) -> tuple[str, str] | None:
    """The judge's text -> (label, rationale), or None when it has no known verdict.

    As LLM Comparator: the verdict inside ``<verdict>`` must be one of the 7 labels (case, quotes and
    a final period are forgiven); the rationale is ``<explanation>``'s text ("" when missing)."""
    m = _VERDICT.search(raw)
    if m is None:
        return None
    label = _LABELS.get(m.group(1).strip(" \t\n'\"`.[]").lower())
    if label is None:
        return None
    e = _EXPLANATION.search(raw)
    return label, html.unescape(e.group(1).strip()) if e else ""


@dataclass
class Rating:
    """One judge call, in LLM Comparator's ``individual_rater_scores`` shape (``as_json``)."""

    is_flipped: bool
    score: float | None  # in the A/B order (a flipped rating's label is negated back); None: unparsable
    rating_label: str | None  # the label as the judge wrote it (in its own, possibly flipped, order)
    rationale: str | None
    attempts: int
    raw: str  # the last answer

    def as_json(self) -> dict:
        fields = {"attempts": self.attempts}
        if self.score is None:
            fields.update(parsed="no", raw_output=self.raw)
        return {"is_flipped": self.is_flipped, "score": self.score, "rating_label": self.rating_label,
                "rationale": self.rationale, "custom_fields": fields}


# generate(judge_prompts, attempt) -> one raw answer per prompt; attempt 0 is the first try.
JudgeFn = Callable[[Sequence[str], int], Sequence[str]]


def rate(pairs: Sequence[tuple[str, str, str]], generate: JudgeFn, retries: int = 2) -> list[list[Rating]]:
    """(prompt, answer A, answer B) per example -> its two ratings [unflipped, flipped].

    All unparsed calls of one attempt go to ``generate`` together (one batch per attempt)."""
    calls = []  # (example, flipped, judge prompt)
    for i, (prompt, a, b) in enumerate(pairs):
        calls.append((i, False, judge_prompt(prompt, a, b)))
        calls.append((i, True, judge_prompt(prompt, b, a)))
    results: list[tuple[str, tuple[str, str] | None, int] | None] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(retries + 1):
        if not todo:
            break
        answers = list(generate([calls[j][2] for j in todo], attempt))
        if len(answers) != len(todo):
            raise RuntimeError(f"the judge returned {len(answers)} answers for {len(todo)} prompts")
        for j, raw in zip(todo, answers):
            results[j] = (raw, parse(raw), attempt + 1)
        todo = [j for j in todo if results[j][1] is None]
    out: list[list[Rating]] = [[] for _ in pairs]
    for (i, flipped, _), (raw, parsed, attempts) in zip(calls, results):
        if parsed is None:
            out[i].append(Rating(flipped, None, None, None, attempts, raw))
        else:
            label, rationale = parsed
            score = -SCALE[label] if flipped else SCALE[label]
            out[i].append(Rating(flipped, score, label, rationale, attempts, raw))
    return out


def example_score(ratings: Sequence[Rating]) -> float | None:
    """The mean of the parsed ratings (LLM Comparator's ``score``); None when none parsed."""
    scores = [r.score for r in ratings if r.score is not None]
    return sum(scores) / len(scores) if scores else None
