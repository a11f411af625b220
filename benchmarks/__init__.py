"""Benchmarks of uamt_fast (not shipped): micro-benchmarks (``python -m pytest benchmarks/``), the
train-step A/B (``python -m benchmarks.train_step``) and the one-shot GPU check (``gpu_check.sh``).
Run from the repository root. See benchmarks/README.md."""
