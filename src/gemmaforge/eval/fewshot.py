"""Few-shot selection and prompt assembly, lm-eval's rules (``lm_eval/api/samplers.py`` and
``ConfigurableTask.fewshot_context`` / ``build_qa_turn`` / ``construct_requests``, plain text, no chat
template).

Selection. One ``random.Random(seed)`` per task (lm-eval's ``fewshot_random_seed``, default 1234),
drawn from in document order, so document i's examples depend on the documents before it, exactly
as in lm-eval (and ``--limit`` keeps the first documents' examples unchanged):
- ``default``: ``rnd.sample(pool, n)``; when the evaluated document may be in the pool
  (``spec.excludes_eval_doc``) ``rnd.sample(pool, n + 1)`` minus that document, first n kept;
- ``first_n``: the pool's first n in stored order (MMLU's dev split, MBPP's fixed examples).

Prompt. ``description + sum(question + target_delimiter + answer + fewshot_delimiter) + question``;
the answer of an example is ``choices[target]`` when the target is an index, its first element
when a list, else the target text. Multiple-choice requests are (prompt, target_delimiter + choice)
per choice; Winogrande's (prefix + partial sentence per option, target_delimiter + rest).
"""

from __future__ import annotations

import random

from ..errors import GemmaforgeError
from .tasks.spec import Doc, TaskSpec

DEFAULT_SEED = 1234  # lm_eval.defaults.DEFAULT_OTHER_SEED


class Sampler:
    def __init__(self, spec: TaskSpec, pool: list[Doc], seed: int | None = DEFAULT_SEED):
        self.spec, self.pool, self.rnd = spec, pool, random.Random(seed)

    def sample(self, n: int, doc: Doc) -> list[Doc]:
        if n == 0:
            return []
        exclude = doc if self.spec.excludes_eval_doc else None
        where = self.spec.fewshot_source or "its fixed examples"
        if self.spec.fewshot_sampler == "first_n":
            pool = [x for x in self.pool if x != exclude] if exclude is not None else self.pool
            if n > len(pool):
                raise GemmaforgeError(f"{self.spec.name}: {n} few-shot examples asked for but {where} has "
                                      f"only {len(pool)}: lower --num-fewshot")
            return pool[:n]
        if not self.pool:
            raise GemmaforgeError(f"{self.spec.name}: {n} few-shot examples asked for but {where} is empty")
        try:
            if not exclude:
                res = self.rnd.sample(self.pool, n)
            else:
                res = [x for x in self.rnd.sample(self.pool, n + 1) if x != exclude][:n]
                if len(res) < n:  # duplicates of the document were drawn: lm-eval redraws without them
                    res = self.rnd.sample([x for x in self.pool if x != exclude], n)
        except ValueError:  # the pool is smaller than the draw
            raise GemmaforgeError(f"{self.spec.name}: {n} few-shot examples asked for but {where} has only "
                                  f"{len(self.pool)} documents (lm-eval draws n + 1 here when the evaluated "
                                  "split is the few-shot one): lower --num-fewshot") from None
        return res


def _answer(spec: TaskSpec, shot: Doc) -> tuple[str, str | None]:
    """(question text, answer text or None) of one few-shot example."""
    q, a = spec.doc_to_text(shot), spec.doc_to_target(shot)
    c = spec.doc_to_choice(shot) if spec.doc_to_choice is not None else None
    if spec.multiple_input:
        q, c = c[q], None
    if a is None or a == "":
        return q, None
    if c and isinstance(a, int):
        return q, c[a]
    return q, a[0] if isinstance(a, list) else a


def context(spec: TaskSpec, doc: Doc, shots: list[Doc]) -> str | list[str]:
    """The prompt of ``doc`` after ``shots``; a list of prompts (one per option) for multiple input."""
    prefix = spec.description
    for shot in shots:
        q, a = _answer(spec, shot)
        prefix += q if a is None else q + spec.target_delimiter + a + spec.fewshot_delimiter
    if spec.multiple_input:
        return [prefix + option for option in spec.doc_to_choice(doc)]
    return prefix + spec.doc_to_text(doc)


def loglikelihood_arguments(spec: TaskSpec, doc: Doc, ctx: str | list[str]) -> list[tuple[str, str]]:
    """One (context, continuation) per choice of a multiple-choice document."""
    if spec.multiple_input:
        return [(c, f"{spec.target_delimiter}{spec.doc_to_target(doc)}") for c in ctx]
    return [(ctx, f"{spec.target_delimiter}{choice}") for choice in spec.doc_to_choice(doc)]
