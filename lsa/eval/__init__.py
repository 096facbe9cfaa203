"""Evaluation: RULER tasks, baselines at equal budget, reports."""
