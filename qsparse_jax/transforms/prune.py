"""One-shot N:M (default 2:4) pruning of every block linear: magnitude, Wanda or SparseGPT.

``qsparse prune --method magnitude|wanda|sparsegpt (--ckpt DIR | --hf DIR) --out DIR
[--calib_batches B] [--n 2 --m 4] [--eval_batches K] [data.key=value ...]``

Writes ``OUT/checkpoints/0`` (parameters, the pruned weights with their zeros in place) and
``OUT/config.yaml`` (the source's config, unchanged: a dense model whose block weights happen to be N:M),
so the result trains (``train.py --config OUT/config.yaml --init_from OUT/checkpoints``; with
``model.weight_sparsity.n: 2`` the AST masks start from these zeros), evaluates
(``qsparse eval --ckpt OUT/checkpoints``) and exports (``qsparse export-hf``) like any other
checkpoint. The embedding and LM head stay dense.

Calibration (Wanda, SparseGPT): the first ``B`` training batches of the config's data source (the
checkpoint's ``data`` section; for ``--hf`` the default embedded corpus with the model's tokenizer, or
``--config``'s; ``data.*`` overrides on top), blocks pruned one after another on the outputs of the already pruned ones
(``transforms/calibration.py``'s ``prune_model``). ``--eval_batches K`` also prints the validation loss before and after.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..checkpoints.native import empty_checkpoints_dir, write_model_checkpoint
from ..checkpoints.source import load
from ..config import (
    Config,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
)
from ..data.pipeline import load_splits, val_batches
from ..errors import ConfigError
from ..nn.model import functional, nll_sum
from ..train.step import split_batch
from .calibration import METHODS, calibration_batches, prune_model


def _data_config(config, seq_len, overrides, saved_cfg, model_cfg):
    if config:
        data = load_config(config, []).data
    else:
        data = saved_cfg.data
    if overrides:
        bad = [o for o in overrides if not o.startswith("data.")]
        if bad:
            raise ConfigError(f"only data.* overrides apply to pruning, got {bad[0]!r}")
        data = from_dict(Config, apply_overrides({"data": to_dict(data)}, list(overrides))).data
    if seq_len:
        data = dataclasses.replace(data, seq_len=seq_len)
    if data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len {data.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    return data


def validation_loss(model, data_cfg, n_batches: int) -> float:
    """Mean next-token NLL over the first ``n_batches`` validation batches."""
    import jax

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
    loaded = load(hf=hf, ckpt=ckpt)
    saved = loaded.config
    model, mcfg = loaded.model, loaded.model.config
    if mcfg.weight_sparsity.enabled:
        raise ConfigError(f"{loaded.source} was trained with model.weight_sparsity (its weights are already "
                          f"{mcfg.weight_sparsity.n}:{mcfg.weight_sparsity.m} under their masks): evaluate or export it")
    for group, d in mcfg.group_input_dims().items():
        if d % m:
            raise ConfigError(f"--m {m} must divide every block linear's input size; {group} has {d}")
    data = _data_config(config, seq_len, overrides, saved, mcfg)
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
    cfg = dataclasses.replace(saved, model=mcfg, data=data)
    tokenizer_from = hf if hf is not None and data.tokenizer.endswith("tokenizer.json") else None
    summary["out"] = str(write_model_checkpoint(model, cfg, out_dir, tokenizer_from=tokenizer_from, what="--out"))
    return summary

