"""Device mesh and the one logical-axis → mesh-axis rules table (MaxText style).

Parameters name their axes where they are created (``logical_axes`` metadata in ``layers.py``); this
table is the only place those names meet mesh axes. A dimension whose size a mesh axis does not
divide stays replicated along that axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import MeshConfig
from ..errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# logical axis -> mesh axes it is split over, in order. Parameters use embed / vocab / heads / kv / mlp;
# activations use batch / length and the act_* names: the batch is split over every data-parallel axis
# and the model dimension of activations is never split (FSDP gathers weights, not activations)
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "mlp": ("tensor",),
    "length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """While tracing inside this context, ``constrain`` pins activations to ``mesh`` by logical name."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing ``activation_sharding`` (None outside one)."""
    return _ACTIVATION_MESH.get()


def target_platform() -> str:
    """The platform the program being traced is compiled for: the active mesh's devices (a TPU slice
    compiled from a CPU host says ``tpu``), else the host's default backend."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """``with_sharding_constraint`` of an activation by the logical names of its dimensions (MaxText's
    logical constraints), when traced under ``activation_sharding``; otherwise ``x`` unchanged, so
    layers stay usable outside any mesh."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh)))


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor); a size of -1 takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % fixed:
            raise ConfigError(f"mesh sizes {tuple(sizes)} do not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                          f"but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical_axes, shape, mesh: Mesh) -> P:
    """PartitionSpec for an array whose dimensions carry these logical names."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axes = tuple(a for a in LOGICAL_RULES.get(name, ()) if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh):
    """NamedSharding for every variable of an (abstract) ``nnx.State``, from its logical axes."""

    def one(v):
        axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
        shape = v.shape if isinstance(v, nnx.Variable) else np.shape(v)
        if axes and len(shape) == len(axes) + 1:  # scan_layers: a leading layer axis, never sharded
            axes = ("layers", *axes)
        spec = logical_to_spec(axes, shape, mesh) if axes else P()
        return v.replace(NamedSharding(mesh, spec)) if isinstance(v, nnx.Variable) else NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split over every data-parallel axis (data and fsdp)."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"]))



def data_parallel_size(mesh: Mesh) -> int:
    """Devices a batch is split over: the product of the mesh axes of the ``batch`` rule."""
    return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])


def _listing(values: list[int], limit: int = 10) -> str:
    shown = [str(v) for v in values[:limit]] + (["..."] if len(values) > limit else [])
    return ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else shown[0]


def _multiples(n: int, k: int) -> list[int]:
    """The multiples of ``k`` nearest ``n`` (below, when positive, and above)."""
    below = n // k * k
    return [m for m in (below, below + k) if m > 0] if below else [k, 2 * k]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_batch(batch_size: int, mesh: Mesh, grad_accum: int = 1, what: str = "data.batch_size") -> None:
    """A ``ConfigError`` (one line naming the sizes and the values that would divide) when the global
    batch does not split evenly over the data-parallel devices or into ``grad_accum`` micro-batches;
    checked before anything is compiled or allocated."""
    n = data_parallel_size(mesh)
    if batch_size % n:
        sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
        fits = [d for d in _divisors(batch_size) if mesh.size % d == 0]
        raise ConfigError(f"{what}={batch_size} does not divide over the {n} data-parallel devices of mesh {sizes}: "
                          f"use a multiple of {n} ({_listing(_multiples(batch_size, n))}), or mesh sizes whose "
                          f"data x fsdp is {_listing(fits)} (mesh.tensor takes the other devices)")
    if batch_size % grad_accum:
        raise ConfigError(f"{what}={batch_size} does not split into optim.grad_accum={grad_accum} equal micro-batches: "
                          f"use a multiple of {grad_accum} ({_listing(_multiples(batch_size, grad_accum))}), or "
                          f"optim.grad_accum={_listing(_divisors(batch_size))}")


def unsplit_dimensions(state: nnx.State, mesh: Mesh) -> str | None:
    """One line naming the parameter dimensions a mesh axis does not divide (they stay replicated along
    it, ``logical_to_spec``) and the axis sizes that would divide them all; None when every one divides."""
    found: dict[tuple[str, ...], set[tuple[str, int]]] = {}
    for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
        if not axes:
            continue
        shape = v.shape[-len(axes):]  # scan_layers: a leading layer axis, never sharded
        for name, dim in zip(axes, shape):
            over = tuple(a for a in LOGICAL_RULES.get(name, ()) if mesh.shape[a] > 1)
            if over and dim % math.prod(mesh.shape[a] for a in over):
                found.setdefault(over, set()).add((name, dim))
    if not found:
        return None
    parts = []
    for over, dims in found.items():
        size = math.prod(mesh.shape[a] for a in over)
        named = " x ".join(f"{a}={mesh.shape[a]}" for a in over) + (f" ({size})" if len(over) > 1 else "")
        fits = [d for d in _divisors(math.gcd(*(d for _, d in dims))) if mesh.size % d == 0]
        which = ", ".join(f"{name} {dim}" for name, dim in sorted(dims))
        parts.append(f"mesh {named} does not divide the parameter dimensions {which}, which stay replicated over it "
                     f"(sizes dividing them all on {mesh.size} devices: {_listing(fits)})")
    return "note: " + "; ".join(parts)
