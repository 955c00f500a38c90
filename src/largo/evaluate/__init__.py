"""Evaluation stage: metrics and reports."""
