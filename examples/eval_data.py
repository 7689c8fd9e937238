"""Build a small evaluation folder for ``gemmaforge eval`` from nothing but this repository and Python.

    python examples/eval_data.py eval_demo
    gemmaforge eval --tasks wikitext,arc_easy,mmlu,gsm8k,mbpp --data eval_demo --output eval_demo/out

- ``wikitext/test.jsonl``: perplexity on text that ships with Python: the docstrings of sixteen
  standard-library modules, one "page" each (the wikitext task's column), so the numbers depend on
  the Python version (docs/evaluation.md quotes 3.11);
- ``arc_easy/test.jsonl``: 20 easy science and general-knowledge questions in allenai/ai2_arc's columns;
- ``mmlu/dev.jsonl`` + ``mmlu/test.jsonl``: two subjects in cais/mmlu's columns, 5 dev examples each
  (the few-shot block) and 8 test questions each;
- ``gsm8k/train.jsonl`` + ``gsm8k/test.jsonl``: 6 + 6 one-step word problems with "#### N" answers;
- ``mbpp/test.jsonl``: 5 small programming problems with three assertions each.
The questions were written for this demo: they are not benchmark data, and scores on them only show
that the pipeline runs end to end on a real model.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

MODULES = ["pdb", "configparser", "re", "socketserver", "statistics", "fileinput", "json", "argparse", "shelve",
           "csv", "cmd", "hashlib", "timeit", "unittest", "copy", "heapq"]

ARC = [  # question, choices, index of the right one
    ("Which of these is a source of light?", ["the Sun", "the Moon", "a mirror", "a rock"], 0),
    ("What do plants need from the air to make food?", ["carbon dioxide", "nitrogen", "helium", "smoke"], 0),
    ("Water freezes at what temperature in degrees Celsius?", ["0", "10", "50", "100"], 0),
    ("Which animal is a mammal?", ["a whale", "a shark", "a frog", "a snake"], 0),
    ("What force pulls objects toward the Earth?", ["gravity", "magnetism", "friction", "wind"], 0),
    ("Which planet is closest to the Sun?", ["Mars", "Mercury", "Jupiter", "Saturn"], 1),
    ("What is the main gas in the air we breathe?", ["oxygen", "hydrogen", "nitrogen", "carbon dioxide"], 2),
    ("Which of these is a liquid at room temperature?", ["iron", "ice", "water", "salt"], 2),
    ("How many legs does an insect have?", ["four", "eight", "six", "ten"], 2),
    ("Which organ pumps blood through the body?", ["the lungs", "the stomach", "the brain", "the heart"], 3),
    ("What do bees make?", ["milk", "silk", "wool", "honey"], 3),
    ("Which of these is the hardest?", ["chalk", "talc", "wood", "diamond"], 3),
    ("What causes day and night on Earth?", ["the Earth spinning on its axis", "the Moon blocking the Sun",
                                             "clouds covering the sky", "the Sun turning off"], 0),
    ("Which tool is used to measure temperature?", ["a ruler", "a thermometer", "a scale", "a compass"], 1),
    ("A caterpillar turns into which animal?", ["a beetle", "a butterfly", "a spider", "a worm"], 1),
    ("Which of these is a renewable source of energy?", ["coal", "oil", "wind", "natural gas"], 2),
    ("What is the boiling point of water at sea level in degrees Celsius?", ["50", "75", "100", "150"], 2),
    ("Which part of a plant takes in water from the soil?", ["the flower", "the leaf", "the stem", "the roots"], 3),
    ("What is ice made of?", ["frozen water", "frozen air", "salt", "glass"], 0),
    ("Which sense do we use our ears for?", ["taste", "smell", "hearing", "sight"], 2),
]

MMLU = {
    "elementary_mathematics": {
        "dev": [("What is 7 + 5?", ["10", "11", "12", "13"], 2), ("What is 9 x 3?", ["27", "24", "21", "30"], 0),
                ("What is half of 18?", ["6", "8", "9", "12"], 2), ("What is 15 - 8?", ["6", "7", "8", "9"], 1),
                ("How many sides does a triangle have?", ["2", "3", "4", "5"], 1)],
        "test": [("What is 6 + 8?", ["12", "13", "14", "15"], 2), ("What is 4 x 5?", ["9", "20", "25", "16"], 1),
                 ("What is 100 divided by 10?", ["1", "10", "100", "1000"], 1),
                 ("How many sides does a square have?", ["3", "4", "5", "6"], 1),
                 ("What is 12 - 4?", ["6", "7", "8", "9"], 2), ("What is 3 squared?", ["6", "9", "12", "27"], 1),
                 ("Which number is even?", ["3", "7", "8", "11"], 2), ("What is 2 + 2 x 3?", ["8", "12", "10", "7"], 0)],
    },
    "high_school_geography": {
        "dev": [("What is the capital of France?", ["Paris", "Rome", "Madrid", "Berlin"], 0),
                ("Which is the largest ocean?", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
                ("On which continent is Kenya?", ["Asia", "Africa", "Europe", "South America"], 1),
                ("Which river flows through Egypt?", ["the Nile", "the Amazon", "the Danube", "the Thames"], 0),
                ("What is the capital of Japan?", ["Kyoto", "Osaka", "Tokyo", "Seoul"], 2)],
        "test": [("What is the capital of Italy?", ["Milan", "Rome", "Naples", "Venice"], 1),
                 ("Which continent is Brazil in?", ["Africa", "Europe", "South America", "Asia"], 2),
                 ("What is the capital of Germany?", ["Berlin", "Munich", "Hamburg", "Vienna"], 0),
                 ("Which is the longest river in South America?", ["the Nile", "the Amazon", "the Volga", "the Rhine"], 1),
                 ("Mount Everest is in which mountain range?", ["the Alps", "the Andes", "the Rockies", "the Himalayas"], 3),
                 ("What is the capital of Spain?", ["Lisbon", "Barcelona", "Madrid", "Seville"], 2),
                 ("Which country has the largest population in South Asia?", ["India", "Nepal", "Bhutan", "Sri Lanka"], 0),
                 ("The Sahara is a large what?", ["forest", "lake", "desert", "mountain"], 2)],
    },
}

GSM8K_TRAIN = [
    ("Ann has 3 red pens and 4 blue pens. How many pens does she have?", "3 + 4 = <<3+4=7>>7 pens.", 7),
    ("A box holds 6 eggs. How many eggs are in 5 boxes?", "6 * 5 = <<6*5=30>>30 eggs.", 30),
    ("Tim had 20 marbles and gave away 8. How many marbles does he have left?", "20 - 8 = <<20-8=12>>12 marbles.", 12),
    ("A pizza is cut into 8 slices and 3 are eaten. How many slices are left?", "8 - 3 = <<8-3=5>>5 slices.", 5),
    ("Sam reads 10 pages a day. How many pages does he read in 4 days?", "10 * 4 = <<10*4=40>>40 pages.", 40),
    ("There are 12 cookies shared equally by 4 children. How many does each child get?", "12 / 4 = <<12/4=3>>3 cookies.", 3),
]
GSM8K_TEST = [
    ("Mia has 5 apples and buys 7 more. How many apples does she have?", "5 + 7 = <<5+7=12>>12 apples.", 12),
    ("A car has 4 wheels. How many wheels do 6 cars have?", "4 * 6 = <<4*6=24>>24 wheels.", 24),
    ("Leo had 15 stickers and lost 6. How many stickers does he have now?", "15 - 6 = <<15-6=9>>9 stickers.", 9),
    ("A class has 9 boys and 11 girls. How many children are in the class?", "9 + 11 = <<9+11=20>>20 children.", 20),
    ("Each bag holds 3 oranges. How many oranges are in 7 bags?", "3 * 7 = <<3*7=21>>21 oranges.", 21),
    ("Kate has 18 flowers and puts them equally into 3 vases. How many flowers are in each vase?",
     "18 / 3 = <<18/3=6>>6 flowers.", 6),
]

MBPP = [
    ("Write a function to return the sum of two numbers.", "def add(a, b):\n    return a + b",
     ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]),
    ("Write a function to check whether a number is even.", "def is_even(n):\n    return n % 2 == 0",
     ["assert is_even(2) == True", "assert is_even(7) == False", "assert is_even(0) == True"]),
    ("Write a function to reverse a string.", "def reverse_string(s):\n    return s[::-1]",
     ["assert reverse_string('abc') == 'cba'", "assert reverse_string('') == ''", "assert reverse_string('ab') == 'ba'"]),
    ("Write a function to find the largest number in a list.", "def max_of_list(xs):\n    return max(xs)",
     ["assert max_of_list([1, 5, 3]) == 5", "assert max_of_list([-2, -7]) == -2", "assert max_of_list([4]) == 4"]),
    ("Write a function to count the vowels in a string.",
     "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())",
     ["assert count_vowels('hello') == 2", "assert count_vowels('xyz') == 0", "assert count_vowels('AEIOU') == 5"]),
]


def write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    out = p.parse_args().out
    write(out / "wikitext" / "test.jsonl", [{"page": importlib.import_module(m).__doc__} for m in MODULES])
    letters = "ABCD"
    write(out / "arc_easy" / "test.jsonl", [
        {"id": f"demo_{i}", "question": q, "choices": {"text": c, "label": list(letters)}, "answerKey": letters[a]}
        for i, (q, c, a) in enumerate(ARC)])
    for split in ("dev", "test"):
        write(out / "mmlu" / f"{split}.jsonl", [
            {"question": q, "subject": subject, "choices": c, "answer": a}
            for subject, splits in MMLU.items() for q, c, a in splits[split]])
    for split, rows in (("train", GSM8K_TRAIN), ("test", GSM8K_TEST)):
        write(out / "gsm8k" / f"{split}.jsonl", [{"question": q, "answer": f"{w}\n#### {n}"} for q, w, n in rows])
    write(out / "mbpp" / "test.jsonl", [
        {"task_id": 1000 + i, "text": t, "code": c, "test_list": tests, "test_setup_code": "", "challenge_test_list": []}
        for i, (t, c, tests) in enumerate(MBPP)])
    print(f"wrote {out} (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
