"""Offline transforms that read a model and write a checkpoint: one-shot N:M pruning, dense → LTE."""
