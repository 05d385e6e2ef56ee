"""Checkpoints: our orbax format, Hugging Face interop, and the one ``--hf | --ckpt`` source resolver."""
