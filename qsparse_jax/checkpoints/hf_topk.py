"""Our exports' top-K sparsity in transformers: hooks that make a loaded export compute as it was trained.

transformers' Llama / Mistral / Qwen2 / BitNet models have no top-K; an export's ``config.json`` holds it
under our key ``qsparse`` (:mod:`.hf_config`), which transformers keeps as ``model.config.qsparse``.
:func:`apply_topk` hooks every projection of such a model so that its input keeps the ``keep[group]``
largest-magnitude entries per token (per block of ``block_size``; ties to the lowest index; with
``rescale: l2_preserve`` scaled back to the token's L2 norm), as our ``SparseLinear`` does::

    model = transformers.AutoModelForCausalLM.from_pretrained(DIR)
    handles = apply_topk(model)   # sparse, as trained
    for h in handles:             # dense again
        h.remove()

A BitLinear with an input RMSNorm (``use_rms_norm``) is sparsified after that norm, as ours is. This
module imports torch (an optional dependency: nothing else in the package imports this module).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# projection → Q-Sparse group (the key of config.json's qsparse.keep)
GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "out", "gate_proj": "gate_up",
          "up_proj": "gate_up", "down_proj": "down"}


def topk(x: torch.Tensor, k: int, block_size: int | None = None, rescale: str = "none") -> torch.Tensor:
    """``x`` keeping the ``k`` largest-magnitude entries of its last axis (of each block of ``block_size``),
    the lowest index first among equal magnitudes; ``rescale="l2_preserve"`` scales each row back to its
    L2 norm."""
    d = x.shape[-1]
    span = block_size or d
    if d % span or not 1 <= k <= span:
        raise ValueError(f"top-K keeps 1..{span} of each {'block' if block_size else 'row'} of {d} features "
                         f"(block_size {block_size}), got k={k}")
    xs = x.reshape(*x.shape[:-1], d // span, span)
    order = torch.sort(xs.abs(), dim=-1, descending=True, stable=True).indices  # stable: ties by index
    mask = torch.zeros_like(xs, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    y = torch.where(mask, xs, torch.zeros((), dtype=x.dtype)).reshape(x.shape)
    if rescale == "l2_preserve":
        full = x.float().square().sum(-1, keepdim=True).sqrt()
        kept = y.float().square().sum(-1, keepdim=True).sqrt()
        scale = torch.where(kept > 0, full / torch.where(kept > 0, kept, 1.0), 1.0)
        y = (y.float() * scale).to(x.dtype)
    elif rescale != "none":
        raise ValueError(f"rescale must be 'none' or 'l2_preserve', got {rescale!r}")
    return y


def qsparse_config(source) -> dict:
    """The ``qsparse`` section of an export: from a model (``model.config.qsparse``), its config, a
    ``config.json`` dict, or the export's directory / ``config.json`` path."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        source = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    cfg = getattr(source, "config", source)
    q = cfg.get("qsparse") if isinstance(cfg, dict) else getattr(cfg, "qsparse", None)
    if not isinstance(q, dict) or not isinstance(q.get("keep"), dict):
        raise ValueError("no 'qsparse.keep' in this config: it is not a Q-Sparse export, or one written before "
                         "config.json held the keep counts (export it again)")
    return q


def apply_topk(model: torch.nn.Module, config=None) -> list:
    """Hook the top-K of an export (``config``: see :func:`qsparse_config`; default ``model``'s own) onto
    every projection of ``model``; returns the hook handles (``handle.remove()`` undoes one)."""
    q = qsparse_config(model if config is None else config)
    keep = q["keep"]
    sp = q.get("sparsity", {})
    block_size, rescale = sp.get("block_size"), sp.get("rescale", "none")
    if sp.get("select", "auto") == "statistical":  # exact top-K hooks would compute another function
        raise ValueError("this export was trained with statistical top-K (sparsity.select: statistical); "
                         "apply_topk implements the exact top-K only")
    handles = []
    for name, module in model.named_modules():
        group = GROUPS.get(name.rsplit(".", 1)[-1])
        if group is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        k = keep.get(group)
        if k is None:  # a dense group
            continue
        sparsify = lambda x, k=k: topk(x, k, block_size, rescale)
        norm = getattr(module, "rms_norm", None)  # BitLinear's input norm runs first, as in ours
        if isinstance(norm, torch.nn.Module):
            handles.append(norm.register_forward_hook(lambda m, args, out, f=sparsify: f(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, args, f=sparsify: (f(args[0]), *args[1:])))
    if not handles and any(v is not None for v in keep.values()):
        raise ValueError(f"no {'/'.join(GROUPS)} modules in {type(model).__name__} to apply the top-K to")
    return handles
