#!/usr/bin/env sh
# The distillation experiment of docs/distillation.md: the embedded Gemma 3 270M teaches the
# gemma2-small preset on Python's documentation; distilled vs from scratch at equal tokens.
# About 25 minutes on two CPU cores; writes runs/distill-experiment/ and docs/distillation_curves.png.
set -e
exec python -m gemmaforge.train.experiment --out runs/distill-experiment --steps 64 "$@"
