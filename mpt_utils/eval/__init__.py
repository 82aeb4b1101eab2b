"""Evaluators: perplexity, downstream tasks, speed and size."""
