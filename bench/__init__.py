"""Benchmarks against the tools an operator would use instead, as ratios."""
