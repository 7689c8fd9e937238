"""Winogrande (allenai/winogrande, winogrande_xl), lm-eval's ``winogrande/default.yaml``: partial
scoring. The sentence is cut at its blank "_"; each option filled in gives one *context*
(``sentence[:blank] + option``) and the continuation is the rest of the sentence after the blank,
the same for both, so the choice is the context under which the rest is most likely. Few-shot
examples show the correct option's context + " " + the rest. Validation, few-shot from train; acc.

Columns: sentence, option1, option2, answer ("1" or "2").
"""

from .spec import MULTIPLE_CHOICE, Metric, TaskSpec


def doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]  # the gold index: lm-eval's "multiple inputs" convention


def doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


WINOGRANDE = TaskSpec(
    name="winogrande", output_type=MULTIPLE_CHOICE, dataset_path="allenai/winogrande",
    dataset_name="winogrande_xl", columns=("sentence", "option1", "option2", "answer"),
    doc_to_text=doc_to_text, doc_to_target=doc_to_target, doc_to_choice=doc_to_choice,
    training_split="train", validation_split="validation",
    metrics=(Metric("acc"),), version=1.0,
    templates={"doc_to_text": "preprocess_winogrande.doc_to_text",
               "doc_to_target": "preprocess_winogrande.doc_to_target",
               "doc_to_choice": "preprocess_winogrande.doc_to_choice", "multiple_input": True},
)
