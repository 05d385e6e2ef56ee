"""Fixtures the tests and the benchmarks share (tiny local models, tokenizers, tasks)."""
