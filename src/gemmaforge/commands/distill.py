"""``gemmaforge distill CONFIG.yaml [--key value ...]``: distillation from a live teacher or cached logits.

With ``teacher_cache: DIR`` and no complete cache there yet, the teacher's logits are computed first
(``--cache-only`` stops after that). See docs/distillation.md.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import GemmaforgeError
from ..train.config import add_config_flags, config_from_args


def add_arguments(parser) -> None:
    add_config_flags(parser)
    parser.add_argument("--cache-only", action="store_true", help="build the teacher cache, then stop")


def run(args) -> int:
    import os

    from ..train.distill import build_teacher_cache
    from ..train.loop import train
    from .train import _report

    cfg = config_from_args(args)
    if not (cfg.teacher or cfg.teacher_cache):
        raise GemmaforgeError("distillation needs teacher: MODEL (or 'default') or teacher_cache: DIR in the config")
    if args.cache_only and not cfg.teacher_cache:
        raise GemmaforgeError("--cache-only needs teacher_cache: DIR in the config")
    if cfg.teacher_cache and not (Path(cfg.teacher_cache) / "meta.json").is_file():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise GemmaforgeError("build the teacher cache with one process first: gemmaforge distill CONFIG --cache-only")
        build_teacher_cache(cfg, progress=cfg.progress)
    if args.cache_only:
        print(f"gemmaforge: teacher cache in {cfg.teacher_cache}")
        return 0
    _report(train(cfg))  # a config with a teacher distils
    return 0
