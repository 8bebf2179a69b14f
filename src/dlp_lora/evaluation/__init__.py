"""Evaluation: the harness over test splits, metrics, bootstrap intervals, reports and plots."""
