"""One error type for everything a user can get wrong.

The CLI prints ``str(error)`` as a single line and exits with code 2; library callers catch
``GemmaforgeError``. Messages say what is wrong and what to do, e.g.
``checkpoint /x/model.safetensors is missing tensor 'model.norm.weight': is this a Gemma checkpoint?``
"""


class GemmaforgeError(Exception):
    """Bad input from the user (file, config, argument). Never a bug in gemmaforge."""
