"""HellaSwag (Rowan/hellaswag), lm-eval's ``hellaswag/hellaswag.yaml`` + ``utils.py``: the context is
``activity_label: ctx_a Ctx_b`` and each ending a choice, both through lm-eval's WikiHow clean-up
(" [title]" -> ". ", other [bracketed] spans removed, double spaces collapsed); evaluated on
validation, few-shot from train; acc and acc_norm.

Columns: ind, activity_label, ctx_a, ctx_b, ctx, endings [4], source_id, split, split_type, label ("0".."3").
"""

import re

from .spec import MULTIPLE_CHOICE, Metric, TaskSpec


def preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of the WikiHow part of HellaSwag
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def process_doc(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {**doc, "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}


HELLASWAG = TaskSpec(
    name="hellaswag", output_type=MULTIPLE_CHOICE, dataset_path="Rowan/hellaswag", dataset_name=None,
    columns=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    process_docs=process_doc,
    doc_to_text=lambda doc: doc["query"], doc_to_target=lambda doc: int(doc["label"]),
    doc_to_choice=lambda doc: list(doc["choices"]),
    training_split="train", validation_split="validation",
    metrics=(Metric("acc"), Metric("acc_norm")), version=1.0,
    templates={"process_docs": "utils.process_docs", "doc_to_text": "{{query}}", "doc_to_target": "{{label}}",
               "doc_to_choice": "choices"},
    reference="73.0 / 81.9 / 86.4 (10-shot, acc_norm)",
)
