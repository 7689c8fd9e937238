"""PIQA (baber/piqa), lm-eval's ``piqa/piqa.yaml``: ``Question: {goal}\\nAnswer:`` with the two
solutions as choices; validation, few-shot from train; acc and acc_norm.

Columns: goal, sol1, sol2, label (0 or 1).
"""

from .spec import MULTIPLE_CHOICE, Metric, TaskSpec

PIQA = TaskSpec(
    name="piqa", output_type=MULTIPLE_CHOICE, dataset_path="baber/piqa", dataset_name=None,
    columns=("goal", "sol1", "sol2", "label"),
    doc_to_text=lambda doc: f"Question: {doc['goal']}\nAnswer:", doc_to_target=lambda doc: doc["label"],
    doc_to_choice=lambda doc: [doc["sol1"], doc["sol2"]],
    training_split="train", validation_split="validation",
    metrics=(Metric("acc"), Metric("acc_norm")), version=1.0,
    templates={"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
               "doc_to_choice": "{{[sol1, sol2]}}"},
)
