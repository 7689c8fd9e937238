"""Serving benchmark: the same as ``gemmaforge bench serve`` (see that command's --help).

    python bench/serve.py --llama-server /path/to/llama-server --out bench-serve.json
"""

import sys

from gemmaforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "serve", *sys.argv[1:]]))
