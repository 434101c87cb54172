"""Evaluation and measurement: load balance, compute per token, benchmarks against peers."""
