"""CPU inference benchmark: the same as ``gemmaforge bench`` (see that command's --help).

    python bench/inference.py --out bench-inference.json
"""

import sys

from gemmaforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
