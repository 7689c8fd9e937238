"""MBPP (google-research-datasets/mbpp, full), lm-eval's ``mbpp/mbpp.yaml`` + ``utils.py``: 3-shot by
default with lm-eval's fixed examples (task ids 2, 3, 4, in order), each shown as

    You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:

    {test_list[0]}
    {test_list[1]}
    {test_list[2]}
    [BEGIN]
    {code}
    [DONE]

then the problem's own prompt up to "[BEGIN]\\n"; greedy generation until "[DONE]"; pass_at_1: the
generation followed by the problem's three assertions runs in a sandboxed subprocess
(eval/sandbox.py) and passes when it finishes without an exception within the time limit (the rule
of HF evaluate's ``code_eval``, which lm-eval calls). Test split.

Columns: task_id, text, code, test_list [3], test_setup_code, challenge_test_list.
"""

from .spec import GENERATE_UNTIL, Metric, TaskSpec


def doc_to_text(doc):
    t = doc["test_list"]
    return (f"You are an expert Python programmer, and here is your task: {doc['text']} "
            f"Your code should pass these tests:\n\n{t[0]}\n{t[1]}\n{t[2]}\n[BEGIN]\n")


def doc_to_target(doc):
    if "is_fewshot" in doc:
        return f"{doc['code']}\n[DONE]"
    t = doc["test_list"]
    return f"{t[0]}\n{t[1]}\n{t[2]}"


# lm-eval's utils.list_fewshot_samples(): MBPP problems 2-4 of the prompt split.
FEWSHOT = (
    {"task_id": 2, "text": "Write a function to find the similar elements from the given two tuple lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
     "test_list": ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                   "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                   "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"],
     "is_fewshot": True},
    {"task_id": 3, "text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                   "assert is_not_prime(35) == True"],
     "is_fewshot": True},
    {"task_id": 4,
     "text": "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n  return largest_nums",
     "test_list": ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"],
     "is_fewshot": True},
)

MBPP = TaskSpec(
    name="mbpp", output_type=GENERATE_UNTIL, dataset_path="google-research-datasets/mbpp", dataset_name="full",
    columns=("text", "test_list"),
    doc_to_text=doc_to_text, doc_to_target=doc_to_target, test_split="test",
    fewshot_sampler="first_n", fewshot_samples=FEWSHOT, num_fewshot=3, target_delimiter="",
    metrics=(Metric("pass_at_1"),),
    generation_kwargs={"until": ["[DONE]"], "do_sample": False},
    unsafe_code=True, version=1.0,
    templates={"doc_to_text": "You are an expert Python programmer, and here is your task: {{text}} Your code "
                              "should pass these tests:\n\n{{test_list[0]}}\n{{test_list[1]}}\n{{test_list[2]}}\n[BEGIN]\n",
               "doc_to_target": "{% if is_fewshot is defined %}{{code}}\n[DONE]{% else %}{{test_list[0]}}\n"
                                "{{test_list[1]}}\n{{test_list[2]}}{% endif %}"},
    reference="29.6 / 52.4 / 62.6 (3-shot)",
)
