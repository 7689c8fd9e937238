"""The task registry: every task ``gemmaforge eval --tasks`` knows, as data (``spec.TaskSpec``), one
benchmark per file, each a transcription of lm-eval's YAML of the same name.

    from gemmaforge.eval.tasks import resolve
    leaves, groups = resolve(["mmlu", "arc_easy"])   # TaskSpecs to run, GroupSpecs to aggregate
"""

from __future__ import annotations

from ...errors import GemmaforgeError
from . import arc, bbq, boolq, gsm8k, hellaswag, mbpp, mmlu, piqa, wikitext, winogrande
from .spec import GroupSpec, TaskSpec

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    arc.ARC_EASY, arc.ARC_CHALLENGE, hellaswag.HELLASWAG, piqa.PIQA, winogrande.WINOGRANDE, boolq.BOOLQ,
    bbq.BBQ, gsm8k.GSM8K, mbpp.MBPP, wikitext.WIKITEXT, *mmlu.TASKS,
]}
GROUPS: dict[str, GroupSpec] = {g.name: g for g in mmlu.GROUPS}
# The names listed in help and errors (the per-subject MMLU tasks and groups are accepted too).
BENCHMARKS = ("mmlu", "arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande", "boolq", "gsm8k", "mbpp",
              "bbq", "wikitext")


def known_names() -> str:
    return (", ".join(BENCHMARKS) + "; also mmlu_stem, mmlu_other, mmlu_social_sciences, mmlu_humanities "
            "and mmlu_<subject> (e.g. mmlu_anatomy)")


def resolve(names: list[str]) -> tuple[list[TaskSpec], list[GroupSpec]]:
    """Leaf tasks in request order (groups expanded depth-first, duplicates dropped) and every group
    involved, children before parents."""
    leaves: dict[str, TaskSpec] = {}
    groups: dict[str, GroupSpec] = {}

    def visit(name: str) -> None:
        if name in TASKS:
            leaves.setdefault(name, TASKS[name])
        elif name in GROUPS:
            for child in GROUPS[name].children:
                visit(child)
            groups.setdefault(name, GROUPS[name])
        else:
            raise GemmaforgeError(f"unknown task {name!r}: known tasks are {known_names()}")

    for name in names:
        visit(name.strip())
    return list(leaves.values()), list(groups.values())


__all__ = ["TASKS", "GROUPS", "BENCHMARKS", "TaskSpec", "GroupSpec", "resolve", "known_names"]
