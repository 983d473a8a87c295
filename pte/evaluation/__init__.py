"""Evaluation: the math sets (MATH-500, AIME, ...), the evaluation loop, its records, metrics and plots."""
