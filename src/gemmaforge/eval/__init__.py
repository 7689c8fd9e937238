"""Evaluation of language models: perplexity (perplexity.py), the one implementation every caller uses."""
