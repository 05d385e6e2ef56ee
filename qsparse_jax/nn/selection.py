"""How a layer's top-K input selection runs: the fused Pallas kernel per shard on TPU, else ``ops.topk``.

``select`` (``model.sparsity.select``): ``auto`` uses ``kernels.pallas_topk`` — one HBM read and one
write of the activations instead of one read per search pass (whole rows) or the XLA rank path's
materialized comparisons (N:M blocks of at most ``BLOCK_MAX``) — when the program is compiled for TPU
(``sharding.target_platform``: the mesh's devices, so a slice compiled from a CPU host counts), the
selection is plain Q-Sparse (no rescale, the straight-through gradient) and the feature axis is not
split over the mesh; everything else runs the XLA search of ``ops.topk`` (``xla``), and
``statistical`` its approximate threshold. ``fused`` requires a kernel: the TPU ones as ``auto``, and on
GPUs ``kernels.pallas_topk.topk_rows_gpu`` (whole rows; opt-in because it has not yet run on a GPU, only
in the interpreter and lowered to Triton), and is an error where none applies. The kernel is a Pallas
call, which GSPMD does not partition: it runs under ``shard_map`` with the activation's rows split as
the batch is and whole rows per shard.
"""

from __future__ import annotations

from functools import partial

import jax
from jax.ad_checkpoint import checkpoint_name

from ..errors import ConfigError
from ..kernels.pallas_topk import BLOCK_MAX, topk_blocks, topk_rows, topk_rows_gpu
from ..ops.topk import topk_sparsify
from .sharding import active_mesh, logical_to_spec, target_platform


def fused_applies(x: jax.Array, block_size, rescale: str, grad: str, select: str = "auto") -> bool:
    """Whether ``select`` (``auto`` or ``fused``) takes a fused kernel for this input here (module docstring)."""
    mesh = active_mesh()
    whole_rows = mesh is None or mesh.shape.get("tensor", 1) == 1
    platform = target_platform()
    shapes = {"tpu": block_size is None or block_size <= BLOCK_MAX,
              "gpu": block_size is None and select == "fused"}.get(platform, False)
    return shapes and rescale == "none" and grad == "ste" and whole_rows and x.ndim >= 2


def _fused(x, k, block_size):
    if target_platform() == "gpu":
        return topk_rows_gpu(x, k)
    return topk_rows(x, k) if block_size is None else topk_blocks(x, k, block_size)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fused_ste(x, k, block_size=None):
    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return _fused(x, k, block_size)
    spec = logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
    return jax.shard_map(lambda x: _fused(x, k, block_size), mesh=mesh, in_specs=(spec,), out_specs=spec,
                         check_vma=False)(x)


_fused_ste.defvjp(lambda x, k, b: (_fused_ste(x, k, b), None), lambda k, b, _, g: (g,))  # Eq. 13: identity


TOPK_NAME = "topk"  # the selection's output, for remat policies (``model.remat: dots_topk`` saves it)


def select_topk(x: jax.Array, k: int, *, block_size=None, rescale: str = "none", grad: str = "ste",
                select: str = "auto") -> jax.Array:
    """``x ⊙ Top_k(|x|)`` (Eq. 2–3) by the path ``select`` names (module docstring); the output is named
    ``TOPK_NAME`` (``jax.ad_checkpoint.checkpoint_name``) so a remat policy can keep it."""
    if select in ("auto", "fused") and fused_applies(x, block_size, rescale, grad, select):
        y = _fused_ste(x, k, block_size)
    elif select == "fused":
        raise ConfigError(f"model.sparsity.select=fused: no fused selection kernel for this input on {target_platform()} "
                         "(TPU: whole rows or N:M blocks of at most 64; GPU: whole rows; both: rescale none, grad ste, "
                         "the feature axis not split over the mesh); use auto or xla")
    else:
        y = topk_sparsify(x, k, block_size=block_size, rescale=rescale, grad=grad,
                          select="xla" if select == "auto" else select)
    return checkpoint_name(y, TOPK_NAME)
