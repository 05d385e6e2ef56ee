"""The ``qsparse`` command line: one dispatcher over the commands, each a thin file in this package.

``qsparse COMMAND [options]`` (or ``python -m qsparse_jax COMMAND``); ``qsparse COMMAND --help`` for
a command's options. Flags are spelled ``--snake_case``; ``--kebab-case`` is accepted for every flag.
Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

from .. import __version__

# command -> (module in this package, its entry function, the one line that --help shows). The lines
# live here, not in the modules, so that `qsparse --help` imports no command (and no JAX).
COMMANDS = {
    "train": ("train", "main", "train a Q-Sparse / BitNet transformer from a YAML config"),
    "prepare": ("prepare", "main", "tokenize a corpus once into token shards for training"),
    "import-hf": ("convert", "import_main", "convert a Hugging Face model directory into a checkpoint"),
    "export-hf": ("convert", "export_main", "convert a checkpoint into a Hugging Face model directory"),
    "eval": ("eval", "main", "perplexity and multiple-choice accuracy, dense vs sparse side by side"),
    "generate": ("generate", "main", "generate text from a prompt and time decoding, sparse vs dense"),
    "prune": ("prune", "main", "prune a model's weights to N:M (magnitude, Wanda or SparseGPT)"),
    "lte": ("lte", "main", "turn a dense model into an LTE (learned expert skipping) checkpoint"),
    "compile": ("compile", "main", "compile the train step or decoding for a TPU slice and report memory"),
    "bench": ("bench", "main", "benchmarks: top-K layer, train step, kernels, evaluation, full suite"),
    "scaling-law": ("scaling_law", "main", "fit, solve and plot the sparsity scaling law"),
    "lm-eval": ("lm_eval", "main", "lm-evaluation-harness with this library's models as --model qsparse_jax"),
    "demo": ("demo", "main", "a forward pass of a tiny sparse model: loss and measured sparsity"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: qsparse COMMAND [options]   (qsparse COMMAND --help for a command's options)", "",
             "Sparsely-activated (Q-Sparse) and 1.58-bit (BitNet) language models in JAX.", "", "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_, _, line) in COMMANDS.items()]
    lines += ["", "Flags are spelled --snake_case; --kebab-case is accepted too.",
              "Bad input: one line on stderr, exit status 2."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _dispatch(argv)
    except BrokenPipeError:  # output piped into a reader that stopped early (`qsparse --help | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush must not fail too
        return 141


def _dispatch(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-h", "--help", "help"):
        print(usage())
        return 0
    if cmd in ("-V", "--version"):
        print(f"qsparse {__version__}")
        return 0
    if cmd not in COMMANDS:
        near = difflib.get_close_matches(cmd, COMMANDS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        print(f"error: unknown command {cmd!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module, entry, _ = COMMANDS[cmd]
    # imported only when the command runs: each command loads its own dependencies (`qsparse prepare`
    # and `qsparse --help` must not import JAX)
    return getattr(importlib.import_module(f".{module}", __name__), entry)(rest)
