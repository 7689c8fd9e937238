"""What a task is: a frozen record of lm-eval's task config fields, with the prompt functions as code.

Each field has lm-eval's meaning (``lm_eval/config/task.py``, ``lm_eval/api/task.py``); the task files
(``arc.py``, ``mmlu.py``, ...) fill them from lm-eval's YAML of the same name, and
``tests/test_eval_tasks.py`` checks every prompt, choice list, target, few-shot context and metric
against lm-eval's own task objects built from those YAMLs on fixture data.

Splits follow lm-eval exactly:
- the evaluated split is ``test_split`` when set, else ``validation_split``;
- few-shot examples come from ``fewshot_split`` when set, else from ``fewshot_samples`` (a fixed list,
  MBPP), else from ``training_split``, ``validation_split`` or ``test_split``, the first that is set,
  after ``process_docs``;
- the evaluated document is removed from its few-shot draw only when ``fewshot_split == test_split``
  (lm-eval compares the two config values, so two unset values count as equal: HellaSwag, PIQA,
  Winogrande and BoolQ draw n + 1 and drop the document itself, ARC and BBQ draw n).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Doc = dict[str, Any]

MULTIPLE_CHOICE = "multiple_choice"
GENERATE_UNTIL = "generate_until"
LOGLIKELIHOOD_ROLLING = "loglikelihood_rolling"


@dataclass(frozen=True)
class Filter:
    """One named pipeline of lm-eval filters (``filter_list`` entries); steps are ``(function, kwargs)``
    with the functions lm-eval registers: ``regex`` and ``take_first``."""

    name: str
    steps: tuple[tuple[str, Mapping[str, Any]], ...]


NO_FILTER = (Filter("none", (("take_first", {}),)),)


@dataclass(frozen=True)
class Metric:
    """A ``metric_list`` entry: name, aggregation (a name in ``metrics.AGGREGATIONS``), direction,
    and the keyword arguments lm-eval passes to the metric function (exact_match's options)."""

    name: str
    aggregation: str = "mean"
    higher_is_better: bool = True
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    output_type: str  # multiple_choice | generate_until | loglikelihood_rolling
    # Where the data come from: DIR/<data_name>/<split>.{parquet,jsonl}, or the HF datasets cache.
    dataset_path: str  # the Hugging Face dataset (lm-eval's dataset_path)
    dataset_name: str | None
    columns: tuple[str, ...]  # columns the prompt functions read (checked when loading)
    doc_to_text: Callable[[Doc], Any]
    doc_to_target: Callable[[Doc], Any]
    doc_to_choice: Callable[[Doc], list[str]] | None = None
    data_name: str | None = None  # folder under DIR (default: the task name)
    row_filter: Callable[[Doc], bool] | None = None  # MMLU: one subject out of the "all" files
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    fewshot_sampler: str = "default"  # "default" (seeded random.sample) | "first_n"
    fewshot_samples: tuple[Doc, ...] | None = None
    process_docs: Callable[[Doc], Doc] | None = None  # per document, as lm-eval's dataset.map
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int | None = None  # lm-eval's default when --num-fewshot is not given (None = 0)
    metrics: tuple[Metric, ...] = ()
    # Task-specific per-document scoring (lm-eval's process_results: BBQ, wikitext); None = the
    # standard rule for the output type (metrics.process_results).
    process_results: Callable[[Doc, list], dict[str, Any]] | None = None
    generation_kwargs: Mapping[str, Any] | None = None
    filters: tuple[Filter, ...] = NO_FILTER
    version: float = 1.0
    alias: str | None = None
    unsafe_code: bool = False  # MBPP: the metric runs model-written code (eval/sandbox.py)
    # The lm-eval YAML's template strings, reported in the results' "configs" and in the docs.
    templates: Mapping[str, Any] = field(default_factory=dict)
    # Gemma 2's published score (model cards: 2B / 9B / 27B), docs/reference.md §7; orientation only.
    reference: str | None = None

    @property
    def folder(self) -> str:
        return self.data_name or self.name

    @property
    def eval_split(self) -> str:
        return self.test_split if self.test_split is not None else self.validation_split

    @property
    def fewshot_source(self) -> str | None:
        """The split few-shot examples come from (None: the fixed ``fewshot_samples``)."""
        if self.fewshot_split is not None:
            return self.fewshot_split
        if self.fewshot_samples is not None:
            return None
        return self.training_split or self.validation_split or self.test_split

    @property
    def excludes_eval_doc(self) -> bool:
        return self.fewshot_split == self.test_split

    @property
    def multiple_input(self) -> bool:
        """Winogrande: doc_to_text gives the gold index, the choices are the contexts."""
        return self.templates.get("multiple_input", False)

    def config(self, num_fewshot: int) -> dict[str, Any]:
        """The results' ``configs`` entry, in lm-eval's ``TaskConfig.to_dict()`` field names."""
        out: dict[str, Any] = {"task": self.name}
        if self.alias:
            out["task_alias"] = self.alias
        out |= {"dataset_path": self.dataset_path}
        if self.dataset_name is not None:
            out["dataset_name"] = self.dataset_name
        for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out |= {k: v for k, v in self.templates.items() if k != "multiple_input"}
        out |= {"description": self.description, "target_delimiter": self.target_delimiter,
                "fewshot_delimiter": self.fewshot_delimiter,
                "fewshot_config": {"sampler": self.fewshot_sampler}, "num_fewshot": num_fewshot,
                "metric_list": [{"metric": m.name, "aggregation": m.aggregation,
                                 "higher_is_better": m.higher_is_better, **m.kwargs} for m in self.metrics],
                "output_type": self.output_type}
        if self.generation_kwargs is not None:
            out["generation_kwargs"] = dict(self.generation_kwargs)
        out["repeats"] = 1
        if self.filters is not NO_FILTER:
            out["filter_list"] = [{"name": f.name, "filter": [{"function": fn, **kw} for fn, kw in f.steps]}
                                  for f in self.filters]
        if self.unsafe_code:
            out["unsafe_code"] = True
        out["metadata"] = {"version": self.version}
        return out


@dataclass(frozen=True)
class GroupSpec:
    """An lm-eval group (MMLU and its four categories): children are task or group names; the
    score is the size-weighted mean of the leaves' ``metric`` with the pooled standard error."""

    name: str
    children: tuple[str, ...]
    alias: str | None = None
    metric: str = "acc"
    weight_by_size: bool = True
    version: float = 2
    reference: str | None = None
