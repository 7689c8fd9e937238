"""GSM8K (openai/gsm8k, main), lm-eval's ``gsm8k/gsm8k.yaml``: 5-shot by default, random train
examples shown with their full worked answers; greedy generation until "Question:" (or "</s>",
"<|im_end|>", or the model's end of sequence); two filters on the generation:

- ``strict-match``: the number after "#### " (``#### (\\-?[0-9\\.\\,]+)``, first match);
- ``flexible-extract``: the last number anywhere (``(-?[$0-9.,]{2,})|(-?[0-9]+)``);

then exact_match against the reference answer after both sides drop ",", "$", everything up to
"#### " and a final ".", case-insensitively.

Columns: question, answer.
"""

from .spec import GENERATE_UNTIL, Filter, Metric, TaskSpec

GSM8K = TaskSpec(
    name="gsm8k", output_type=GENERATE_UNTIL, dataset_path="openai/gsm8k", dataset_name="main",
    columns=("question", "answer"),
    doc_to_text=lambda doc: f"Question: {doc['question']}\nAnswer:", doc_to_target=lambda doc: str(doc["answer"]),
    training_split="train", fewshot_split="train", test_split="test", num_fewshot=5,
    metrics=(Metric("exact_match", kwargs={"ignore_case": True, "ignore_punctuation": False,
                                           "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}),),
    generation_kwargs={"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0},
    filters=(
        Filter("strict-match", (("regex", {"regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}), ("take_first", {}))),
        Filter("flexible-extract", (("regex", {"group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"}),
                                    ("take_first", {}))),
    ),
    version=3.0,
    templates={"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}"},
    reference="23.9 / 68.6 / 74.0 (5-shot, maj@1)",
)
