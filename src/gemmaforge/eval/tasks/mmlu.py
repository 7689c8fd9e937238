"""MMLU (cais/mmlu), lm-eval's ``mmlu/default``: one task per subject (``mmlu_<subject>``), each with
the description "The following are multiple choice questions (with answers) about {subject}.",
its dev examples as few-shot in their stored order (sampler first_n), the question with its four
options lettered A-D, and the letters " A" .. " D" as the scored continuations; acc. The groups
``mmlu_stem``, ``mmlu_other``, ``mmlu_social_sciences``, ``mmlu_humanities`` and ``mmlu`` report the
size-weighted mean over their subjects with the pooled standard error.

Data: ``DIR/mmlu/test`` (evaluated) and ``DIR/mmlu/dev`` (few-shot) holding any subjects, in the
columns of cais/mmlu's "all" configuration: question, subject, choices [4], answer (0-3). Subjects
absent from the test file are skipped (and named on stderr).
"""

from .spec import MULTIPLE_CHOICE, GroupSpec, Metric, TaskSpec

# lm-eval's tasks/mmlu/_generate_configs.py SUBJECTS: subject -> category
SUBJECTS = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem", "high_school_us_history": "humanities",
    "high_school_world_history": "humanities", "human_aging": "other", "human_sexuality": "social_sciences",
    "international_law": "humanities", "jurisprudence": "humanities", "logical_fallacies": "humanities",
    "machine_learning": "stem", "management": "other", "marketing": "other", "medical_genetics": "other",
    "miscellaneous": "other", "moral_disputes": "humanities", "moral_scenarios": "humanities",
    "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences", "virology": "other", "world_religions": "humanities",
}
CATEGORIES = {"stem": "stem", "other": "other", "social_sciences": "social sciences", "humanities": "humanities"}
TEMPLATE = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"


def doc_to_text(doc):
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def subject_task(subject: str) -> TaskSpec:
    return TaskSpec(
        name=f"mmlu_{subject}", alias=subject, output_type=MULTIPLE_CHOICE, dataset_path="cais/mmlu",
        dataset_name=subject, data_name="mmlu", row_filter=lambda doc: doc["subject"] == subject,
        columns=("question", "subject", "choices", "answer"),
        doc_to_text=doc_to_text, doc_to_target=lambda doc: doc["answer"],
        doc_to_choice=lambda doc: ["A", "B", "C", "D"],
        test_split="test", fewshot_split="dev", fewshot_sampler="first_n",
        description=f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n",
        metrics=(Metric("acc"),), version=1.0,
        templates={"doc_to_text": TEMPLATE, "doc_to_target": "answer", "doc_to_choice": ["A", "B", "C", "D"]},
    )


TASKS = [subject_task(s) for s in SUBJECTS]
GROUPS = [
    *(GroupSpec(f"mmlu_{c}", tuple(f"mmlu_{s}" for s, cat in SUBJECTS.items() if cat == c), alias=alias)
      for c, alias in CATEGORIES.items()),
    GroupSpec("mmlu", tuple(f"mmlu_{c}" for c in CATEGORIES), reference="51.3 / 71.3 / 75.2 (5-shot, top-1)"),
]
