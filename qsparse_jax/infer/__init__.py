"""Inference: model variants (sparsity, kernels, LTE execution), timed generation, evaluation, lm-eval."""
