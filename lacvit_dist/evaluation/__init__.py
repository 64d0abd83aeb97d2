"""Evaluation: metrics, passes over a split, figures, and the offline evaluation of an exported model."""
