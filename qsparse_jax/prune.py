"""One-shot N:M (default 2:4) pruning of every block linear: magnitude, Wanda or SparseGPT.

``python -m qsparse_jax.prune --method magnitude|wanda|sparsegpt (--ckpt DIR | --hf DIR) --out DIR
[--calib_batches B] [--n 2 --m 4] [--eval_batches K] [data.key=value ...]``

Writes ``OUT/checkpoints/0`` (parameters, the pruned weights with their zeros in place) and
``OUT/config.yaml`` (the source's config, unchanged: a dense model whose block weights happen to be N:M),
so the result trains (``train.py --config OUT/config.yaml --init_from OUT/checkpoints``; with
``model.weight_sparsity.n: 2`` the AST masks start from these zeros), evaluates
(``python -m qsparse_jax.eval --ckpt OUT/checkpoints``) and exports (``convert export-hf``) like any other
checkpoint. The embedding and LM head stay dense.

Calibration (Wanda, SparseGPT): the first ``B`` training batches of the config's data source (the
checkpoint's ``data`` section; for ``--hf`` the default embedded corpus with the model's tokenizer, or
``--config``'s; ``data.*`` overrides on top), blocks pruned one after another on the outputs of the already pruned ones
(``weight_sparsity.prune_model``). ``--eval_batches K`` also prints the validation loss before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .errors import ConfigError

USAGE = __doc__.split("\n\n")[1]


def _data_config(args, saved_cfg, model_cfg, hf_dir: Path | None):
    from .config import Config, DataConfig, apply_overrides, from_dict, load_config, to_dict

    if args.config:
        data = load_config(args.config, []).data
    elif saved_cfg is not None:
        data = saved_cfg.data
    else:
        data = DataConfig(seq_len=min(DataConfig.seq_len, model_cfg.max_seq_len))
        if hf_dir is not None and (hf_dir / "tokenizer.json").is_file():
            data = dataclasses.replace(data, tokenizer=str((hf_dir / "tokenizer.json").absolute()))
    if args.overrides:
        bad = [o for o in args.overrides if not o.startswith("data.")]
        if bad:
            raise ConfigError(f"only data.* overrides apply to pruning, got {bad[0]!r}")
        data = from_dict(Config, apply_overrides({"data": to_dict(data)}, list(args.overrides))).data
    if args.seq_len:
        data = dataclasses.replace(data, seq_len=args.seq_len)
    if data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len {data.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    return data


def calibration_batches(data_cfg, n_batches: int) -> list:
    """The first ``n_batches`` training batches' input tokens (int32 [B, seq_len])."""
    from .data import load_splits, train_dataset
    from .trainer import split_batch

    splits = load_splits(data_cfg)
    it = iter(train_dataset(splits.train, data_cfg))
    return [split_batch(next(it))[0] for _ in range(n_batches)]


def validation_loss(model, data_cfg, n_batches: int) -> float:
    """Mean next-token NLL over the first ``n_batches`` validation batches."""
    import jax

    from .data import load_splits, val_batches
    from .model import functional, nll_sum
    from .trainer import split_batch

    apply, params = functional(model)

    @jax.jit
    def nll(params, batch):
        inputs, targets, kw, weights = split_batch(batch)
        return nll_sum(apply(params, inputs, **kw), targets, weights)

    total = count = 0.0
    for b in val_batches(load_splits(data_cfg).val, data_cfg, n_batches):
        t, n = nll(params, b)
        total, count = total + float(t), count + float(n)
    return total / max(count, 1.0)


def prune(method: str, out: str, *, ckpt: str | None = None, hf: str | None = None, calib_batches: int = 16,
          n: int = 2, m: int = 4, blocksize: int | None = None, percdamp: float = 0.01, eval_batches: int = 0,
          config: str | None = None, seq_len: int | None = None, overrides: list[str] = (),
          progress: bool = True) -> dict:
    """Prune and write the checkpoint (see the module docstring); returns a summary dict."""
    from . import checkpoint as ckpt_mod
    from .config import Config, from_dict
    from .convert import empty_checkpoints_dir, write_model_checkpoint
    from .inference import load
    from .weight_sparsity import METHODS, prune_model

    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (isinstance(m, int) and m >= 2 and isinstance(n, int) and 1 <= n < m):
        raise ConfigError(f"--n and --m must be integers with 1 <= n < m, got n={n}, m={m}")
    blocksize = max(m, 128 // m * m) if blocksize is None else blocksize
    for ok, msg in ((calib_batches >= 1, f"--calib_batches must be >= 1, got {calib_batches}"),
                    (eval_batches >= 0, f"--eval_batches must be >= 0, got {eval_batches}"),
                    (blocksize >= m and blocksize % m == 0, f"--blocksize must be a positive multiple of --m {m}, got {blocksize}"),
                    (0 <= percdamp < 1, f"--percdamp must be in [0, 1), got {percdamp}")):
        if not ok:
            raise ConfigError(msg)
    out_dir = Path(out)
    empty_checkpoints_dir(out_dir, "--out")  # before the (long) calibration
    saved = None
    if ckpt is not None:
        saved = from_dict(Config, ckpt_mod.read_config(ckpt)[0]) if Path(ckpt).is_dir() else None
    loaded = load(hf=hf, ckpt=ckpt)
    model, mcfg = loaded.model, loaded.model.config
    if mcfg.weight_sparsity.enabled:
        raise ConfigError(f"{loaded.source} was trained with model.weight_sparsity (its weights are already "
                          f"{mcfg.weight_sparsity.n}:{mcfg.weight_sparsity.m} under their masks): evaluate or export it")
    for group, d in mcfg.group_input_dims().items():
        if d % m:
            raise ConfigError(f"--m {m} must divide every block linear's input size; {group} has {d}")
    data = _data_config(argparse.Namespace(config=config, seq_len=seq_len, overrides=overrides), saved, mcfg,
                        Path(hf) if hf is not None else None)
    summary: dict = {"method": method, "n": n, "m": m, "source": loaded.source}
    batches = calibration_batches(data, calib_batches) if method != "magnitude" else None
    if batches is not None:
        summary["calib_tokens"] = int(sum(b.size for b in batches))
    if eval_batches:
        summary["val_loss_before"] = validation_loss(model, data, eval_batches)
    model, report = prune_model(model, method, batches, n=n, m=m, blocksize=blocksize, percdamp=percdamp,
                                progress=progress)
    errs = [r["rel_err"] for r in report if "rel_err" in r]
    if errs:
        summary["mean_rel_err"] = sum(errs) / len(errs)
    if eval_batches:
        summary["val_loss_after"] = validation_loss(model, data, eval_batches)
    cfg = dataclasses.replace(saved, model=mcfg, data=data) if saved is not None else Config(model=mcfg, data=data)
    tokenizer_from = hf if hf is not None and data.tokenizer.endswith("tokenizer.json") else None
    summary["out"] = str(write_model_checkpoint(model, cfg, out_dir, tokenizer_from=tokenizer_from, what="--out"))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_jax.prune", description=__doc__.split("\n\n")[0],
                                usage=USAGE.replace("``", ""))
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="training checkpoint directory (or one step of it)")
    src.add_argument("--hf", help="HF model directory (llama / mistral / qwen2 / bitnet)")
    p.add_argument("--out", required=True, help="output directory: OUT/checkpoints/0 + OUT/config.yaml")
    p.add_argument("--calib_batches", "--calib-batches", type=int, default=16, help="calibration batches (wanda, sparsegpt)")
    p.add_argument("--n", type=int, default=2, help="weights kept per group (default 2)")
    p.add_argument("--m", type=int, default=4, help="group size along the input axis (default 4)")
    p.add_argument("--blocksize", type=int, default=None,
                   help="SparseGPT column block, a multiple of --m (default: the largest one <= 128)")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT damping, a fraction of mean diag(H)")
    p.add_argument("--eval_batches", "--eval-batches", type=int, default=0, help="also print the validation loss before and after")
    p.add_argument("--config", help="YAML whose data section gives the calibration data (default: the checkpoint's)")
    p.add_argument("--seq_len", type=int, help="calibration sequence length (default: the data config's)")
    p.add_argument("overrides", nargs="*", help="dotted data.* overrides, e.g. data.source=/data/corpus data.batch_size=8")
    args = p.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        s = prune(args.method, args.out, ckpt=args.ckpt, hf=args.hf, calib_batches=args.calib_batches, n=args.n,
                  m=args.m, blocksize=args.blocksize, percdamp=args.percdamp, eval_batches=args.eval_batches,
                  config=args.config, seq_len=args.seq_len, overrides=args.overrides)
    except ConfigError as e:  # DataError, HFError, CheckpointError are ConfigErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    parts = [f"{k} {v:.4f}" for k, v in s.items() if k in ("val_loss_before", "val_loss_after", "mean_rel_err")]
    print(f"{s['method']} {s['n']}:{s['m']}" + (": " + ", ".join(parts) if parts else ""))
    print(f"wrote {s['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
