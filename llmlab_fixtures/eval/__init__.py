"""Evaluating one task on one model: datasets, prompts, the evaluator, metrics and the records it streams."""
