"""BoolQ (aps/super_glue, boolq), lm-eval's ``super_glue/boolq/default.yaml``:
``{passage}\\nQuestion: {question}?\\nAnswer:`` scored against " no" / " yes"; validation, few-shot
from train; acc.

Columns: question, passage, idx, label (0 = no, 1 = yes).
"""

from .spec import MULTIPLE_CHOICE, Metric, TaskSpec

BOOLQ = TaskSpec(
    name="boolq", output_type=MULTIPLE_CHOICE, dataset_path="aps/super_glue", dataset_name="boolq",
    columns=("question", "passage", "label"),
    doc_to_text=lambda doc: f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
    doc_to_target=lambda doc: doc["label"], doc_to_choice=lambda doc: ["no", "yes"],
    training_split="train", validation_split="validation",
    metrics=(Metric("acc"),), version=2.0,
    templates={"doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
               "doc_to_choice": ["no", "yes"]},
)
