"""What every command shares: the one argument parser, the one error wrapper, the sparsity options.

- :class:`Parser`: flags are spelled ``--snake_case`` (as the config keys they mirror, e.g.
  ``data.text_field``); every flag is also accepted as ``--kebab-case`` (normalized before parsing;
  positional arguments and ``key=value`` overrides are left alone). A usage mistake is one line on
  stderr and exit status 2.
- :func:`command`: runs a command's ``main`` with absl / orbax logging quieted, and turns a user
  error (``ConfigError`` and its subclasses, ``TrainingError``, ``ScalingLawError``) into one line
  ``error: ...`` on stderr and exit status 2, never a traceback; Ctrl-C into one line.
- :func:`add_sparsity_options`: ``--sparsity`` / ``--block_size`` / ``--{group}_sparsity``, read by
  :func:`sparsity_options` into the keyword arguments of ``infer.variants.sparsity_config`` (the one
  way from these options to a ``SparsityConfig``: what is not given stays the model's own).

Nothing here imports JAX (``qsparse prepare`` must start without it).
"""

from __future__ import annotations

import argparse
import functools
import sys

from ..errors import ConfigError

# user errors defined in modules that import JAX: matched only when their module was imported (an
# exception of a class whose module never loaded cannot have been raised)
_LAZY_USER_ERRORS = (("qsparse_jax.train.loop", "TrainingError"), ("qsparse_jax.analysis.scaling_law", "ScalingLawError"))
GROUPS = ("qkv", "out", "gate_up", "down")  # config.PROJECTION_GROUPS, without importing the config module


def snake_flags(argv: list[str]) -> list[str]:
    """``--kebab-case`` flags spelled ``--snake_case`` (the value after ``=`` kept); everything after a
    bare ``--``, positional arguments and ``key=value`` overrides unchanged."""
    out = []
    for i, a in enumerate(argv):
        if a == "--":
            return out + argv[i:]
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a.partition("=")
            a = "--" + name[2:].replace("-", "_") + eq + value
        out.append(a)
    return out


class Parser(argparse.ArgumentParser):
    """``argparse`` with the kebab-case alias of every flag and one-line usage errors (exit 2)."""

    def __init__(self, *args, **kwargs):
        raw = "\n" in (kwargs.get("description") or "")  # a docstring's own line breaks are kept
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a typo is an error, not a guess
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(snake_flags(args), namespace)

    def error(self, message):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def summary(doc: str) -> str:
    """A command module's docstring for ``--help``: its first paragraph and the rest, without the
    leading command name (``qsparse eval``: ...) and the reST double backquotes."""
    text = doc.strip().replace("``", "")
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith("qsparse ") and "\n" not in head else text


def user_errors() -> tuple[type[BaseException], ...]:
    errors = [ConfigError]
    for module, name in _LAZY_USER_ERRORS:
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def quiet_logging() -> None:
    """absl's and orbax's INFO / WARNING chatter is not for users."""
    try:  # absl comes with JAX; a bare prepare install may lack it
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.ERROR)


def fail(message: str) -> int:
    """One line on stderr, exit status 2: for the checks a command makes itself."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def command(interrupted: str = "interrupted"):
    """Decorator for a command's ``main(argv=None) -> int``: quiet logging, user errors -> one line and
    exit 2, Ctrl-C -> ``interrupted`` on one line and exit 130."""

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            quiet_logging()
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(interrupted, file=sys.stderr)
                return 130
            except Exception as e:
                if isinstance(e, user_errors()):
                    return fail(str(e))
                raise

        return run

    return wrap


def add_source_options(p: argparse.ArgumentParser, *, required: bool = True):
    """``--hf DIR | --ckpt DIR``, the model a command reads (resolved by ``checkpoints.source``); returns
    the group, so a command can add another source to it (``generate --config``)."""
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--hf", help="Hugging Face model directory (llama / mistral / qwen2 / bitnet)")
    src.add_argument("--ckpt", help="training checkpoint directory (a run's checkpoints/, or one step of it)")
    return src


def add_sparsity_options(p: argparse.ArgumentParser, *, run: str = "the sparse run",
                         default: str = "the model's own") -> None:
    """``--sparsity S``, ``--block_size M`` and per group ``--qkv_sparsity`` / ``--out_sparsity`` /
    ``--gate_up_sparsity`` / ``--down_sparsity``: unset options keep ``default`` (the model's own, through
    ``infer.variants.sparsity_config``: block size, rescale and gradient included)."""
    p.add_argument("--sparsity", type=float, default=None,
                   help=f"top-K sparsity of every projection input for {run} (default: {default})")
    p.add_argument("--block_size", type=int, default=None,
                   help="Block Q-Sparse: N:M blocks of this size M (default: the model's own)")
    for g in GROUPS:
        p.add_argument(f"--{g}_sparsity", type=float, default=None,
                       help=f"sparsity of the {g} projection inputs only (default: --sparsity)")


def sparsity_options(args: argparse.Namespace) -> dict:
    """The parsed sparsity options as keyword arguments of ``infer.variants.sparsity_config``
    (``sparsity``, ``block_size`` and the per-group values that were given)."""
    kw = {"sparsity": args.sparsity, "block_size": args.block_size}
    kw.update({g: getattr(args, f"{g}_sparsity") for g in GROUPS if getattr(args, f"{g}_sparsity", None) is not None})
    return kw
