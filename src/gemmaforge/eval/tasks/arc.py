"""ARC-Easy and ARC-Challenge (allenai/ai2_arc), lm-eval's ``arc/arc_easy.yaml``: zero-shot by default,
few-shot examples drawn at random from train; every answer text is a choice; acc and acc_norm.

Columns: id, question, choices {text: [...], label: [...]}, answerKey (a label: "A".."E" or "1".."5").
"""

from .spec import MULTIPLE_CHOICE, Metric, TaskSpec


def doc_to_text(doc):
    return f"Question: {doc['question']}\nAnswer:"


def doc_to_target(doc):
    return doc["choices"]["label"].index(doc["answerKey"])


def doc_to_choice(doc):
    return list(doc["choices"]["text"])


def _arc(name: str, subset: str, reference: str | None) -> TaskSpec:
    return TaskSpec(
        name=name, output_type=MULTIPLE_CHOICE, dataset_path="allenai/ai2_arc", dataset_name=subset,
        columns=("question", "choices", "answerKey"),
        doc_to_text=doc_to_text, doc_to_target=doc_to_target, doc_to_choice=doc_to_choice,
        training_split="train", validation_split="validation", test_split="test",
        metrics=(Metric("acc"), Metric("acc_norm")), version=1.0,
        templates={"doc_to_text": "Question: {{question}}\nAnswer:",
                   "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}"},
        reference=reference,
    )


ARC_EASY = _arc("arc_easy", "ARC-Easy", None)
ARC_CHALLENGE = _arc("arc_challenge", "ARC-Challenge", "55.4 / 68.4 / 71.4 (25-shot, acc_norm)")
