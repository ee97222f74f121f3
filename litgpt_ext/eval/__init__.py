"""Evaluation: lm-eval backend for our checkpoints, offline tasks, HF export."""
