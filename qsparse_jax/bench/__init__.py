"""Benchmarks, each a ratio measured in one run: layers, kernels, train step, decode, evaluation speed."""
