"""Compile the real train step ahead of time for a TPU slice (or these devices) and report whether it fits.

``qsparse compile --config C [--topology v5p-128 | --cpu_devices N] [key=value ...]`` (or ``train.py --compile_only``)

The state is abstract (``trainer.abstract_setup``: shapes and shardings, nothing allocated) and the
step is the one training runs (``trainer.make_train_step``: same shardings, donation, remat, scan,
gradient accumulation), lowered and compiled by XLA for the target devices — for a TPU slice through
libtpu's topology description, so a pod config is checked on a CPU machine before renting the pod
(MaxText's ``train_compile.py`` does the same). The report reads ``memory_analysis()`` (arguments,
temporaries, outputs per device) against the chip's HBM and ``cost_analysis()`` (FLOPs, the
compiler's step-time estimate). XLA's cost analysis counts a ``lax.scan`` body once, so with
``scan_layers`` the step's FLOPs and time are extrapolated from one- and two-layer unrolled compiles:
``c(L) = c(1) + (L − 1)·(c(2) − c(1))``.

``decode_report`` does the same for ``generate``'s prefill and KV-cache decode loop (``qsparse compile
--decode``): what was compiled (the target platform's kernel path), the per-token step beside its byte
roofline, and the share of the estimate that is Pallas kernels' declared costs (``kernel_calls``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PROJECTION_GROUPS, Config
from ..errors import ConfigError
from ..nn.decode import decode_step, init_cache, make_generate
from ..nn.layers import pack_for_inference
from ..nn.model import Transformer
from ..nn.sharding import (
    activation_sharding,
    logical_to_spec,
    make_mesh,
    state_shardings,
    unsplit_dimensions,
)
from .metrics import flops_per_token
from .step import abstract_setup, make_train_step, note_once
from .topology import GIB, chip_of, tpu_devices

_OOM = re.compile(r"memory required for ([\w ]+?) \(([\d.]+)G\) exceeds available HBM")


def abstract_batch(cfg: Config, sharding):
    """The batch the step receives, as shapes: int32 [B, L+1] tokens (or the SFT dict)."""
    b, n = cfg.data.batch_size, cfg.data.seq_len + 1
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    if cfg.data.task == "sft":
        return {"tokens": sds((b, n), jnp.int32), "segment_ids": sds((b, n), jnp.int32),
                "positions": sds((b, n), jnp.int32), "weights": sds((b, n - 1), jnp.float32)}
    return sds((b, n), jnp.int32)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays / ShapeDtypeStructs (the largest shard)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shard) * np.dtype(a.dtype).itemsize
    return total


def _cost(compiled) -> dict:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    seconds = float(c.get("optimal_seconds", 0.0) or 0.0)
    return {"flops": float(c.get("flops", 0.0)), "seconds": max(seconds, 0.0),  # < 0: the compiler has no estimate
            "bytes": float(c.get("bytes accessed", 0.0))}


def compile_step(cfg: Config, devices):
    """(compiled step, Setup, abstract state, seconds to lower and compile)."""

    t0 = time.perf_counter()
    s, state = abstract_setup(cfg, devices)
    consts = {m.name: c for m in s.methods if (c := m.abstract_constants(s.mesh)) is not None}  # e.g. a teacher
    compiled = make_train_step(s, consts).lower(state, abstract_batch(cfg, s.batch_sharding)).compile()
    return compiled, s, state, time.perf_counter() - t0


def _layer_corrected_cost(cfg: Config, devices, cost: dict) -> tuple[dict, bool]:
    """The step's cost with every layer counted (see module docstring)."""
    m = cfg.model
    if not m.scan_layers or m.n_layers <= 2:
        return cost, False
    per = []
    for n in (1, 2):
        small = dataclasses.replace(cfg, model=m.replace(n_layers=n, scan_layers=False))
        per.append(_cost(compile_step(small, devices)[0]))
    if not all(per[1][k] > per[0][k] for k in ("flops", "seconds")):
        return cost, False  # too small for per-layer costs to add up (fixed costs dominate): keep the scan's
    return {k: per[0][k] + (m.n_layers - 1) * (per[1][k] - per[0][k]) for k in cost}, True


def report(cfg: Config, topology: str | None = None, margin: float = 0.10, devices=None, costs: bool = True) -> dict:
    """Compile the train step for ``topology`` (a TPU slice name) or ``devices`` (default: local);
    ``costs=False`` skips the per-layer cost extrapolation (two more, small compiles)."""

    if topology:
        devices, chip = tpu_devices(topology)
    else:
        devices = list(devices if devices is not None else jax.devices())
        chip = chip_of(devices[0])

    t0 = time.perf_counter()
    try:
        compiled, s, state, seconds = compile_step(cfg, devices)
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program larger than HBM
        need = _OOM.search(str(e))
        if need is None:
            raise
        s, state = abstract_setup(cfg, devices)
        compiled, seconds = None, time.perf_counter() - t0
        temp = int(float(need.group(2)) * GIB) if "temporaries" in need.group(1) else 0
    if compiled is not None:
        mem = compiled.memory_analysis()
        arg, out, alias, temp = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                                 mem.temp_size_in_bytes)
        cost, corrected = _layer_corrected_cost(cfg, devices, _cost(compiled)) if costs else (_cost(compiled), False)
    else:  # refused: arguments are the state and the batch; outputs alias the donated state
        arg = bytes_per_device(state) + bytes_per_device(abstract_batch(cfg, s.batch_sharding))
        out = alias = bytes_per_device(state)
        cost, corrected = {"flops": float("nan"), "seconds": 0.0, "bytes": float("nan")}, False
    peak = arg + out - alias + temp
    n = len(devices)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    analytic = flops_per_token(cfg) * tokens / n  # 6·N·T + attention, dense convention (as the trainer's mfu)
    r = {
        "topology": topology or f"{n} local {devices[0].platform} device(s)",
        "devices": n, "device_kind": devices[0].device_kind, "chip": chip.name if chip else None,
        "mesh": {k: int(v) for k, v in s.mesh.shape.items()},
        "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
        "params_bytes_per_device": bytes_per_device(state["params"]),
        "opt_state_bytes_per_device": bytes_per_device(state["opt_state"]),
        "argument_bytes": int(arg), "output_bytes": int(out), "alias_bytes": int(alias), "temp_bytes": int(temp),
        "compiler_refused": compiled is None,
        "peak_bytes": int(peak), "hbm_bytes": chip.hbm_bytes if chip else None,
        "flops_per_device_compiler": cost["flops"], "flops_per_device_analytic": analytic,
        "layers_extrapolated": corrected, "step_seconds_estimate": cost["seconds"] or None,
        "compile_seconds": seconds,
    }
    r["fits"] = None if chip is None else peak <= chip.hbm_bytes * (1 - margin)
    r["margin"] = None if chip is None else 1 - peak / chip.hbm_bytes
    r["required_margin"] = margin
    r["mfu_bound"] = (analytic / (cost["seconds"] * chip.peak_flops)
                      if chip is not None and cost["seconds"] else None)
    return r


def format_report(r: dict, config_name: str = "") -> str:
    g = lambda b: f"{b / GIB:,.2f} GiB"
    lines = [f"compile-only {config_name} for {r['topology']}: {r['devices']} x {r['chip'] or r['device_kind']}, "
             f"mesh {' '.join(f'{k}={v}' for k, v in r['mesh'].items())}, batch {r['batch_size']} x {r['seq_len']}",
             f"  per device: parameters {g(r['params_bytes_per_device'])}, optimizer state "
             f"{g(r['opt_state_bytes_per_device'])}",
             f"  compiled step per device: arguments {g(r['argument_bytes'])}, temporaries {g(r['temp_bytes'])}, "
             f"outputs {g(r['output_bytes'])} (aliased {g(r['alias_bytes'])}) -> peak {g(r['peak_bytes'])}"
             + (" (the TPU compiler refused it: temporaries from its out-of-memory message)" if r["compiler_refused"] else "")]
    if r["hbm_bytes"]:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        lines.append(f"  HBM {g(r['hbm_bytes'])}: {verdict} ({100 * r['margin']:.1f} % free, "
                     f"{100 * r['required_margin']:.0f} % required)")
    else:
        lines.append("  HBM: no accelerator chip here to compare with (pass --topology for a TPU slice)")
    fl = f"  FLOPs per device per step: {r['flops_per_device_analytic']:.3e} (6·N·T + attention)"
    fl += f", compiler {r['flops_per_device_compiler']:.3e}" + (" (layers extrapolated)" if r["layers_extrapolated"] else "")
    lines.append(fl)
    if r["step_seconds_estimate"]:
        lines.append(f"  compiler's step time estimate {r['step_seconds_estimate']:.3f} s"
                     + (f" -> MFU bound {100 * r['mfu_bound']:.1f} %" if r["mfu_bound"] is not None else ""))
    lines.append(f"  compile time {r['compile_seconds']:.1f} s")
    return "\n".join(lines)


def shortfall(r: dict) -> str:
    need, have = r["peak_bytes"], r["hbm_bytes"] * (1 - r["required_margin"])
    return (f"does not fit: {need / GIB:,.1f} GiB per device needed, {have / GIB:,.1f} GiB usable on {r['chip']} "
            f"({r['hbm_bytes'] / GIB:,.1f} GiB less {100 * r['required_margin']:.0f} % margin); short by "
            f"{(need - have) / GIB:,.1f} GiB: lower data.batch_size, raise mesh.fsdp / mesh.tensor, or set model.remat=full")


def compile_train(cfg: Config, topology: str | None, config_name: str, json_out: str | None = None) -> int:
    """``qsparse compile``: print the train step's report (and write it to ``json_out``); status 1 with
    the shortfall on stderr when it does not fit."""
    import sys

    r = report(cfg, topology)
    print(format_report(r, config_name), flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(r, f, indent=1)
    if r["fits"] is False:
        print(f"error: {shortfall(r)}", file=sys.stderr)
        return 1
    return 0


# HBM bandwidth per device in bytes/s (Cloud TPU system-architecture pages, NVIDIA data sheets: SXM parts)
HBM_BANDWIDTH = {"TPU v4": 1200e9, "TPU v5e": 819e9, "TPU v5p": 2765e9, "TPU v6e": 1638e9,
                 "NVIDIA H200": 4.8e12, "NVIDIA H100": 3.35e12, "NVIDIA A100": 2.039e12}
# custom calls that are Pallas kernels -> what they are
KERNEL_TARGETS = {"tpu_custom_call": "Pallas TPU kernels (Mosaic)",
                  "__gpu$xla.gpu.triton": "Pallas GPU kernels (Triton)"}
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_DECLARED = re.compile(r'"cost_estimate":\s*\{([^}]*)\}')
_FIELD = lambda name: re.compile(rf'"{name}":\s*"?(\d+)')
_FLOPS, _BYTES = _FIELD("flops"), _FIELD("bytes_accessed")
_NAME = re.compile(r"\s*(?:ROOT\s+)?%([A-Za-z_][\w-]*?)(?:\.\d+)?\s*=")
PROJECTION_KERNELS = ("ternary_matmul", "tpu_decode")  # name parts of the kernels that run a projection
PROJECTIONS = {"wq": "qkv", "wk": "qkv", "wv": "qkv", "wo": "out", "w_gate": "gate_up", "w_up": "gate_up",
               "w_down": "down"}


def kernel_calls(hlo: str) -> dict:
    """The Pallas kernel calls in a compiled program's text (``compiled.as_text()``): ``calls``, ``declared``
    (those carrying a ``pl.CostEstimate``, which XLA's cost analysis then counts; the others are opaque to
    it: no bytes, no FLOPs, no time), the declared ``flops`` and ``bytes`` summed, their ``kind``, and
    ``names``: calls per kernel (the instruction's name, the ``pallas_call``'s ``name``)."""
    r = {"calls": 0, "declared": 0, "flops": 0.0, "bytes": 0.0, "kind": None, "names": {}}
    for line in hlo.splitlines():
        t = _TARGET.search(line)
        if t is None or t.group(1) not in KERNEL_TARGETS:
            continue
        r["calls"] += 1
        r["kind"] = KERNEL_TARGETS[t.group(1)]
        name = m.group(1) if (m := _NAME.match(line)) else "kernel"
        r["names"][name] = r["names"].get(name, 0) + 1
        if (d := _DECLARED.search(line)) is not None:
            r["declared"] += 1
            r["flops"] += float(m.group(1)) if (m := _FLOPS.search(d.group(1))) else 0.0
            r["bytes"] += float(m.group(1)) if (m := _BYTES.search(d.group(1))) else 0.0
    return r


def _step_cost(compiled) -> tuple[dict, str | None]:
    """``_cost`` and the kernel calls' figures (``kernel_*``; ``calls:NAME`` per kernel), and their kind."""
    k = kernel_calls(compiled.as_text())
    c = {**_cost(compiled), **{f"kernel_{n}": float(k[n]) for n in ("calls", "declared", "flops", "bytes")}}
    return {**c, **{f"calls:{n}": float(v) for n, v in k["names"].items()}}, k["kind"]


def decode_params(model_cfg, mesh, bits: float):
    """(graphdef, abstract parameters sharded by the rules table); packed (``bits``) with kernels on."""
    from flax import nnx

    build = lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))
    if model_cfg.kernels != "off":
        # a TPU mesh gets the words layout: the decode kernel DMAs only the kept rows (kernels.packing)
        layout = "tpu" if mesh.devices.flat[0].platform == "tpu" else "bytes"
        build = lambda: pack_for_inference(Transformer(model_cfg, rngs=nnx.Rngs(0)), bits, layout)
    graphdef, params = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(params, mesh)
    # the shardings are a prefix of the parameters: a packed ternary weight (data, scale) has one sharding
    params = jax.tree.map(lambda sh, a: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), a),
                          shardings, params)
    return graphdef, params


def decode_programs(model_cfg, mesh, batch: int, prompt_len: int, new_tokens: int, bits: float = 2,
                    prefill: bool = True):
    """``generate``'s programs compiled for ``mesh``'s devices: (compiled prefill or None, compiled decode loop,
    abstract parameters, abstract KV cache)."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    graphdef, params = decode_params(model_cfg, mesh, bits)
    apply = lambda p, tokens, **kw: nnx.merge(graphdef, p)(tokens, **kw)
    prefill_fn, decode_fn = make_generate(apply, model_cfg, batch, prompt_len, new_tokens)
    rep = NamedSharding(mesh, PartitionSpec())
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rep)
    with activation_sharding(mesh):  # also puts Pallas calls in shard_map (nn.layers), as XLA cannot partition them
        pre = prefill_fn.lower(params, prompt, key).compile() if prefill else None
        first, cache = jax.eval_shape(prefill_fn, params, prompt, key)
        first = jax.ShapeDtypeStruct(first.shape, first.dtype, sharding=rep)
        dec = decode_fn.lower(params, first, cache, key).compile()
    return pre, dec, params, cache


def compile_decode_step(model_cfg, mesh, batch: int, max_len: int, bits: float):
    """One decode step compiled alone for ``mesh``, every layer unrolled: XLA's cost analysis counts a loop's
    body once (the decode loop's, and the layer scan's with ``scan_layers``), and extrapolating from one,
    two and four unrolled layers does not work here (7B on v5e-8, bytes per step: 0.82, 1.76, 3.09 GB;
    7.92 at eight layers: XLA partitions deeper programs differently). The KV cache is sharded as
    attention constrains it."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    m = model_cfg.replace(scan_layers=False)
    graphdef, params = decode_params(m, mesh, bits)
    step = decode_step(lambda p, tokens, **kw: nnx.merge(graphdef, p)(tokens, **kw))
    rep = NamedSharding(mesh, PartitionSpec())
    kv = lambda a: NamedSharding(mesh, logical_to_spec(("batch", "length", "act_kv", None), a.shape, mesh))
    cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=kv(a) if a.ndim == 4 else rep),
                         jax.eval_shape(lambda: init_cache(m, batch, max_len)))
    tok = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rep)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    with activation_sharding(mesh):
        # the cache donated, as the generate loop carries it (updated in place, not copied per step)
        return jax.jit(step, donate_argnums=2).lower(params, tok, cache, key).compile()


def _decode_step_cost(model_cfg, mesh, batch: int, max_len: int, bits: float) -> tuple[dict, str | None, float]:
    """``compile_decode_step``'s (cost, kernel kind, seconds to compile)."""
    t0 = time.perf_counter()
    compiled = compile_decode_step(model_cfg, mesh, batch, max_len, bits)
    return (*_step_cost(compiled), time.perf_counter() - t0)


def _names(path) -> list[str]:
    """The module / variable names along a parameter's path (list indices and ``.value`` left out)."""
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path if not hasattr(k, "idx")]
    return [n for n in names if n != "value"]


def _is_projection_weight(names: list[str]) -> bool:
    """A projection's weight: its float ``weight``, or the ``data`` of its packed copy (which replaces it)."""
    if names[-1:] == ["weight"]:
        return len(names) > 1 and names[-2] in PROJECTIONS
    return names[-2:] == ["packed", "data"] and len(names) > 2 and names[-3] in PROJECTIONS


def _kept_share(model_cfg, group: str, in_features: int, batch: int) -> float:
    """Expected share of a projection's input rows that some token of the batch keeps, 1 − (1 − k/D)^B
    (tokens taken as independent); 1 for a dense projection."""
    keep = model_cfg.keep(group)
    if keep is None:
        return 1.0
    return 1.0 - (1.0 - keep / (model_cfg.sparsity.block_size or in_features)) ** batch


def must_read_bytes(model_cfg, params, cache, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Bytes one device must read from HBM for one decode step, as the program stores them: every weight
    the step multiplies (its per-device shard; a projection read through packed kernels counts its packed
    weight, not the float one), the batch's embedding rows, and the KV cache at its mean length over the
    decode. ``kept``: the same with each top-K projection's weight scaled by the expected share of rows
    any token keeps (``_kept_share``), the floor of a decode that reads only the kept rows."""
    total = kept = 0.0
    for p, a in jax.tree_util.tree_leaves_with_path(params):  # a packed copy carries no float weight
        n, b = _names(p), float(bytes_per_device(a))
        if n == ["embed"] and not model_cfg.tie_embeddings:
            b *= batch / a.shape[0]  # one row per token
        share = 1.0
        if _is_projection_weight(n):  # the weight [.., in, out] or its packed words (not a packed scale)
            proj = n[-2] if n[-1] == "weight" else n[-3]
            share = _kept_share(model_cfg, PROJECTIONS[proj], a.shape[-2], batch)
        total, kept = total + b, kept + b * share
    fill = (prompt_len + new_tokens / 2) / (prompt_len + new_tokens)
    kv = fill * sum(float(bytes_per_device(c)) for c in jax.tree.leaves(cache) if c.ndim >= 4)
    return {"all": total + kv, "kept": kept + kv, "kv_cache": kv}


def _describe(model_cfg, kind: str | None, projection_calls: float, projections: int, platform: str,
              bits: float) -> str:
    if model_cfg.kernels == "off":
        return "XLA float matmuls (kernels off)"
    packed = f"{bits:g}-bit packed ternary weights"
    if projection_calls:
        return f"{kind} in {projection_calls:.0f} of {projections} projections per decode step, {packed}"
    if model_cfg.kernels == "interpret":
        return f"Pallas kernels in interpret mode (plain XLA ops), {packed}"
    return f"XLA int8 x ternary reference path (kernels {model_cfg.kernels}, compiled for {platform}), {packed}"


def decode_report(cfg: Config, topology: str | None = None, batch: int = 1, prompt_len: int = 128,
                  new_tokens: int = 128, margin: float = 0.10, devices=None, bits: float = 2) -> dict:
    """Compile ``generate``'s prefill and KV-cache decode loop for ``topology`` (or ``devices``) with the
    parameters sharded by the rules table; report memory per device, what was compiled (the kernel path
    is chosen for the target's platform), the compiler's per-token step time and bytes beside the byte
    roofline (``must_read_bytes`` ÷ the chip's HBM bandwidth), and how much of the estimate is the
    kernels' declared costs. With ``model.kernels`` on, the ternary weights are packed (``bits``: 2 or 1.6)."""
    from flax import nnx

    if topology:
        devices, chip = tpu_devices(topology)
    else:
        devices = list(devices if devices is not None else jax.devices())
        chip = chip_of(devices[0])
    platform = devices[0].platform
    if cfg.model.kernels == "pallas" and platform not in ("tpu", "gpu"):
        raise ConfigError(f"kernels 'pallas' needs a TPU or GPU target, this compiles for {len(devices)} {platform} "
                          f"device(s); compile for a TPU slice (--topology) or use kernels on or xla")
    mesh = make_mesh(cfg.mesh, devices)
    note_once(unsplit_dimensions(nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))[1], mesh))
    t0 = time.perf_counter()
    pre, dec, params, cache = decode_programs(cfg.model, mesh, batch, prompt_len, new_tokens, bits)
    seconds = time.perf_counter() - t0
    step, kind, step_seconds = _decode_step_cost(cfg.model, mesh, batch, prompt_len + new_tokens, bits)
    calls = {k.split(":", 1)[1]: v for k, v in step.items() if k.startswith("calls:")}
    projections = sum(a.shape[0] if a.ndim == 3 else 1 for p, a in jax.tree_util.tree_leaves_with_path(params)
                      if _is_projection_weight(_names(p)))
    out = {"topology": topology or f"{len(devices)} local {platform} device(s)", "devices": len(devices),
           "chip": chip.name if chip else None, "mesh": {k: int(v) for k, v in mesh.shape.items()},
           "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
           "kernels": cfg.model.kernels, "bits": bits if cfg.model.kernels != "off" else None,
           "sparsity": {g: getattr(cfg.model.sparsity, g) for g in PROJECTION_GROUPS},
           "block_size": cfg.model.sparsity.block_size,
           "compiled": _describe(cfg.model, kind, sum(v for n, v in calls.items() if any(p in n for p in
                                                                                     PROJECTION_KERNELS)),
                                 projections, platform, bits),
           "projections": projections, "kernel_calls": int(step["kernel_calls"]),
           "kernel_calls_by_name": {n: round(v) for n, v in calls.items() if round(v)},
           "kernel_calls_declared": int(step["kernel_declared"]),
           "params_bytes_per_device": bytes_per_device(params), "compile_seconds": seconds,
           "hbm_bytes": chip.hbm_bytes if chip else None}
    for name, c in (("prefill", pre), ("decode", dec)):
        m = c.memory_analysis()
        out[f"{name}_peak_bytes"] = int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                        + m.temp_size_in_bytes)
    out["prefill_seconds_estimate"] = _cost(pre)["seconds"] or None
    peak = max(out["prefill_peak_bytes"], out["decode_peak_bytes"])
    out["fits"] = None if chip is None else peak <= chip.hbm_bytes * (1 - margin)
    out["peak_bytes"], out["required_margin"] = peak, margin
    out["step_compile_seconds"] = step_seconds
    out["decode_seconds_estimate"] = step["seconds"] if step["seconds"] > 0 else None
    out["decode_tokens_per_s_estimate"] = batch / step["seconds"] if step["seconds"] > 0 else None
    out["decode_bytes_accessed"], out["decode_flops"] = step["bytes"], step["flops"]
    out["kernel_declared_bytes"], out["kernel_declared_flops"] = step["kernel_bytes"], step["kernel_flops"]
    need = must_read_bytes(cfg.model, params, cache, batch, prompt_len, new_tokens)
    bw = HBM_BANDWIDTH.get(chip.name) if chip else None
    out["must_read_bytes"], out["must_read_kept_bytes"] = need["all"], need["kept"]
    out["hbm_bytes_per_s"] = bw
    out["roofline_seconds"] = need["all"] / bw if bw else None
    out["roofline_kept_seconds"] = need["kept"] / bw if bw else None
    return out


def format_decode_report(r: dict, config_name: str = "") -> str:
    g = lambda b: f"{b / GIB:,.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:,.2f} MiB"
    ms = lambda s: f"{1e3 * s:.3f} ms"
    groups = ", ".join(f"{k} {100 * (1 - v):.0f} %" for k, v in r["sparsity"].items() if v)
    lines = [f"compile-only decode {config_name} for {r['topology']}: {r['devices']} x {r['chip'] or 'device'}, "
             f"mesh {' '.join(f'{k}={v}' for k, v in r['mesh'].items())}, batch {r['batch']}, prompt {r['prompt_len']} "
             f"+ {r['new_tokens']} new tokens",
             f"  compiled: {r['compiled']}; " + (f"top-K keeps {groups} of each projection input"
                                                  + (f" (blocks of {r['block_size']})" if r["block_size"] else "")
                                                  if groups else "dense (no top-K)"),
             f"  per device: parameters {g(r['params_bytes_per_device'])}; peak prefill {g(r['prefill_peak_bytes'])}, "
             f"decode loop {g(r['decode_peak_bytes'])} (KV cache included)"]
    if r["hbm_bytes"]:
        lines.append(f"  HBM {g(r['hbm_bytes'])}: {'fits' if r['fits'] else 'DOES NOT FIT'}")
    step, bw, nbytes = r["decode_seconds_estimate"], r["hbm_bytes_per_s"], r["decode_bytes_accessed"]
    line = "  one decode step (compiled alone, every layer unrolled): "
    line += (f"compiler's estimate {ms(step)} -> {r['decode_tokens_per_s_estimate']:,.0f} tokens/s; " if step else
             "no compiler's time estimate for this target; ")
    line += f"{g(nbytes)} accessed per device" + (f" ({ms(nbytes / bw)} at HBM bandwidth)" if bw else "")
    lines.append(line)
    if bw:
        vs = lambda t: (f" (estimate {step / t:.2f}x, bytes {nbytes / bw / t:.2f}x)" if step else
                        f" (bytes {nbytes / bw / t:.2f}x)")
        line = (f"  byte roofline at {bw / 1e9:,.0f} GB/s HBM: the step's weights as stored + KV cache "
                f"{g(r['must_read_bytes'])} -> {ms(r['roofline_seconds'])}{vs(r['roofline_seconds'])}")
        if r["must_read_kept_bytes"] < r["must_read_bytes"]:
            line += (f"; kept rows only (top-K, batch {r['batch']}) {g(r['must_read_kept_bytes'])} -> "
                     f"{ms(r['roofline_kept_seconds'])}{vs(r['roofline_kept_seconds'])}")
        lines.append(line)
    calls, declared = r["kernel_calls"], r["kernel_calls_declared"]
    if calls:
        lines.append(f"  Pallas kernel calls per decode step: "
                     + ", ".join(f"{n} {c}" for n, c in sorted(r.get("kernel_calls_by_name", {}).items())))
        share = lambda part, whole: f"{100 * part / whole:.0f} %" if whole else "n/a"
        if declared:
            lines.append(f"  kernels' declared costs (pl.CostEstimate, {declared} of {calls} calls): "
                         f"{share(r['kernel_declared_bytes'], r['decode_bytes_accessed'])} of the step's bytes, "
                         f"{share(r['kernel_declared_flops'], r['decode_flops'])} of its FLOPs"
                         + (f"; their bytes at HBM bandwidth are {share(r['kernel_declared_bytes'] / bw, step)} of "
                            f"the time estimate" if step and bw else ""))
        if declared < calls:
            lines.append(f"  the estimate excludes {calls - declared} opaque kernel calls (no declared cost_estimate: "
                         f"XLA counts their bytes and time as zero)")
    lines.append(f"  compile time {r['compile_seconds']:.1f} s (prefill and decode loop), "
                 f"{r['step_compile_seconds']:.1f} s (one step)")
    return "\n".join(lines)
