"""Evaluation benchmark: the same as ``gemmaforge bench eval`` (see that command's --help).

    python bench/eval.py --questions 80 --repeats 3 --out bench-eval.json
"""

import sys

from gemmaforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "eval", *sys.argv[1:]]))
