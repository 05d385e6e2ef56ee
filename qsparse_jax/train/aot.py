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

from ..config import Config
from ..nn.decode import make_generate
from ..nn.layers import pack_for_inference
from ..nn.model import Transformer
from ..nn.sharding import (
    activation_sharding,
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


def decode_report(cfg: Config, topology: str | None = None, batch: int = 1, prompt_len: int = 128,
                  new_tokens: int = 128, margin: float = 0.10, devices=None, bits: float = 2) -> dict:
    """Compile ``generate``'s prefill and KV-cache decode loop for ``topology`` with the parameters
    sharded by the rules table; report memory per device and the compiler's per-token time. With
    ``model.kernels`` on, the ternary weights are packed (``bits``: 2 or 1.6) as decoding reads them."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    if topology:
        devices, chip = tpu_devices(topology)
    else:
        devices = list(devices if devices is not None else jax.devices())
        chip = chip_of(devices[0])
    mesh = make_mesh(cfg.mesh, devices)
    build = lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))
    note_once(unsplit_dimensions(nnx.split(nnx.eval_shape(build))[1], mesh))
    if cfg.model.kernels != "off":
        build = lambda: pack_for_inference(Transformer(cfg.model, rngs=nnx.Rngs(0)), bits)
    graphdef, params = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(params, mesh)
    # the shardings are a prefix of the parameters: a packed ternary weight (data, scale) has one sharding
    params = jax.tree.map(lambda sh, a: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), a),
                          shardings, params)
    apply = lambda p, tokens, **kw: nnx.merge(graphdef, p)(tokens, **kw)
    prefill, decode = make_generate(apply, cfg.model, batch, prompt_len, new_tokens)
    rep = NamedSharding(mesh, PartitionSpec())
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rep)
    t0 = time.perf_counter()
    with activation_sharding(mesh):
        pre = prefill.lower(params, prompt, key).compile()
        first, cache = jax.eval_shape(prefill, params, prompt, key)
        first = jax.ShapeDtypeStruct(first.shape, first.dtype, sharding=rep)
        dec = decode.lower(params, first, cache, key).compile()
    seconds = time.perf_counter() - t0
    out = {"topology": topology or f"{len(devices)} local {devices[0].platform} device(s)", "devices": len(devices),
           "chip": chip.name if chip else None, "mesh": {k: int(v) for k, v in mesh.shape.items()},
           "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
           "params_bytes_per_device": bytes_per_device(params), "compile_seconds": seconds,
           "hbm_bytes": chip.hbm_bytes if chip else None}
    for name, c in (("prefill", pre), ("decode", dec)):
        m = c.memory_analysis()
        out[f"{name}_peak_bytes"] = int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                        + m.temp_size_in_bytes)
        # the decode loop is a lax.scan: its cost analysis counts one step (module docstring)
        out[f"{name}_seconds_estimate"] = _cost(c)["seconds"] or None
    peak = max(out["prefill_peak_bytes"], out["decode_peak_bytes"])
    out["fits"] = None if chip is None else peak <= chip.hbm_bytes * (1 - margin)
    out["peak_bytes"], out["required_margin"] = peak, margin
    step = out["decode_seconds_estimate"]
    out["decode_tokens_per_s_estimate"] = batch / step if step else None
    return out


def format_decode_report(r: dict, config_name: str = "") -> str:
    g = lambda b: f"{b / GIB:,.2f} GiB"
    lines = [f"compile-only decode {config_name} for {r['topology']}: {r['devices']} x {r['chip'] or 'device'}, "
             f"mesh {' '.join(f'{k}={v}' for k, v in r['mesh'].items())}, batch {r['batch']}, prompt {r['prompt_len']} "
             f"+ {r['new_tokens']} new tokens",
             f"  per device: parameters {g(r['params_bytes_per_device'])}; peak prefill {g(r['prefill_peak_bytes'])}, "
             f"decode loop {g(r['decode_peak_bytes'])} (KV cache included)"]
    if r["hbm_bytes"]:
        lines.append(f"  HBM {g(r['hbm_bytes'])}: {'fits' if r['fits'] else 'DOES NOT FIT'}")
    if r["decode_tokens_per_s_estimate"]:
        lines.append(f"  compiler's estimate: {1e3 * r['decode_seconds_estimate']:.2f} ms per decode step -> "
                     f"{r['decode_tokens_per_s_estimate']:,.0f} tokens/s")
    lines.append(f"  compile time {r['compile_seconds']:.1f} s")
    return "\n".join(lines)

