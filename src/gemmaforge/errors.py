"""One error type for everything a user can get wrong.

The CLI prints ``str(error)`` as a single line and exits with code 2; library callers catch
``GemmaforgeError``. Messages say what is wrong and what to do, e.g.
``checkpoint /x/model.safetensors is missing tensor 'model.norm.weight': is this a Gemma checkpoint?``
"""


class GemmaforgeError(Exception):
    """Bad input from the user (file, config, argument). Never a bug in gemmaforge."""


def unknown_name(kind: str, name: str, known) -> GemmaforgeError:
    """The error for a misspelled option or field: ``unknown KIND 'x': did you mean 'y'?`` when a
    known name is close, else the list of known names (shared so every such message reads alike)."""
    import difflib

    known = list(known)
    hint = difflib.get_close_matches(name, known, n=1)
    advice = f": did you mean {hint[0]!r}?" if hint else f"; use {', '.join(known)}"
    return GemmaforgeError(f"unknown {kind} {name!r}{advice}")
