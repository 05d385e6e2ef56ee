"""``qsparse bench all --out DIR [--quick]``: everything a lent accelerator should record, in one call.

On whatever backend JAX finds (GPU, TPU, or the CPU), in this order, each section timed and kept
within ``--budget_s`` (a section that would start past it is skipped and says so):

1. **checks** — the Pallas kernels natively (Triton on GPU, Mosaic on TPU; the Pallas interpreter on
   CPU): exact int32 accumulators against the XLA reference and ``qsparse_matmul`` against
   ``impl="xla"``, for 2-bit and base-3 packing, decode and batched shapes; and a train step sharded
   over every local device (``mesh.fsdp=-1``) whose loss falls over a few steps on one batch.
2. **kernels** — ``qsparse_matmul`` (top-K, int8, packed ternary) against a dense bf16 matmul for the
   7B projections 4096→11008 and 11008→4096, batch 1 / 8 / 512, kept 100 / 60 / 40 %, with the byte
   roofline from a copy measured now.
3. **train step** — the 7B shape (``configs/7b-qsparse.yaml``, dim 4096, hidden 11008, 32 heads) cut to
   ``--layers`` layers and a small batch, Q-Sparse against the same model dense, interleaved.
4. **decode** — KV-cache decoding tokens/s of the 7B 1.58-bit shape cut the same way: dense, sparse,
   and sparse with the packed-ternary kernels (``model.kernels=on``).

Writes ``DIR/report.md`` (also printed) and ``DIR/report.json``. Exit status 1 when a check fails,
2 on a usage mistake. ``--quick`` shrinks every shape so the whole run takes well under a minute on 2
CPU cores (the CI smoke test); it measures nothing worth recording.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..config import SparsityConfig, load_config
from ..infer.generate import generate
from ..infer.variants import variant
from ..kernels import api, pack_ternary, qsparse_matmul
from ..kernels import reference as R
from ..nn.model import Transformer
from ..ops.topk import keep_count
from ..train.metrics import flops_per_token
from ..train.step import make_train_step, setup
from .micro import _kernel_variants, step_runners
from .timing import _memory_bandwidth, time_interleaved

FULL = dict(shapes=[(4096, 11008), (11008, 4096)], batches=[1, 8, 512], keeps=[1.0, 0.6, 0.4], repeats=10,
            layers=4, step_batch=4, step_seq=2048, step_repeats=5, decode_batch=1, prompt=128, new_tokens=128,
            check_shapes=[(1, 4096, 11008), (8, 11008, 4096), (512, 4096, 11008), (40, 1000, 300)])


QUICK = dict(shapes=[(256, 512)], batches=[1, 8], keeps=[1.0, 0.4], repeats=2,
             layers=1, step_batch=4, step_seq=64, step_repeats=2, decode_batch=1, prompt=8, new_tokens=8,
             check_shapes=[(1, 96, 40), (12, 200, 37)])


QUICK_MODEL = ["model.vocab_size=256", "model.dim=64", "model.n_heads=4", "model.hidden_dim=128",
               "model.max_seq_len=128", "model.scan_layers=false", "model.remat=none"]


SECTIONS = ("checks", "kernels", "step", "decode")


def _device_summary() -> dict:
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "python": sys.version.split()[0]}


def _check_kernels(p: dict) -> list[dict]:
    native = jax.default_backend() in ("gpu", "tpu")
    impl = "pallas" if native else "interpret"
    rows = []
    cases = [(2, 0.4), (2, 1.0), (1.6, 0.4), (1.6, 1.0)]
    for i, (m, d, n) in enumerate(p["check_shapes"]):
        # quick: the decode (gather) kernel on the first shape, the batched one on the second
        for bits, keep in ([cases[2 * i]] if p.get("quick") else cases):
            k = max(1, int(keep * d)) if keep < 1 else None
            kx, kw = jax.random.split(jax.random.key(100 + i))
            x = jax.random.normal(kx, (m, d), jnp.float32)
            w = pack_ternary(jax.random.normal(kw, (d, n), jnp.float32) * d ** -0.5, bits)
            q, _ = R.quantize_input(x, k)
            t0 = time.perf_counter()
            acc = jax.jit(lambda q, w: api._accumulate(q, w, k, None, impl))(q, w)
            exact = bool(np.array_equal(np.asarray(acc), np.asarray(R.accumulate_reference(q, w))))
            y = qsparse_matmul(x, w, k=k, impl=impl)
            y_ref = qsparse_matmul(x, w, k=k, impl="xla")
            err = float(jnp.max(jnp.abs(y - y_ref)) / (jnp.max(jnp.abs(y_ref)) + 1e-30))
            rows.append({"check": f"kernel {impl} {m}x{d}->{n} bits {bits} keep {keep:.0%}",
                         "ok": exact and err < 1e-5, "detail": f"accumulator exact: {exact}, y rel. err {err:.1e}",
                         "seconds": round(time.perf_counter() - t0, 2)})
    return rows


def _check_sharded_step(p: dict) -> dict:
    n = jax.device_count()
    over = ["model.n_layers=2", "data.seq_len=64", f"data.batch_size={max(8, n)}", "mesh.data=1", "mesh.fsdp=-1",
            "mesh.tensor=1", "optim.warmup_steps=1", "optim.lr=3e-3", *QUICK_MODEL]
    cfg = load_config(str(_root() / "configs/tiny.yaml"), over)
    t0 = time.perf_counter()
    s, state = setup(cfg)
    step = make_train_step(s)
    batch = np.random.default_rng(0).integers(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
    b = jax.device_put(batch, s.batch_sharding)
    losses = []
    for _ in range(4):
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    ok = all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    return {"check": f"train step sharded over {n} device(s), mesh {dict(s.mesh.shape)}", "ok": ok,
            "detail": "losses " + " ".join(f"{v:.3f}" for v in losses), "seconds": round(time.perf_counter() - t0, 2)}


def section_checks(p: dict) -> dict:
    rows = _check_kernels(p) + [_check_sharded_step(p)]
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def section_kernels(p: dict) -> dict:
    on_cpu = jax.default_backend() == "cpu"
    copy_bw, read_bw = _memory_bandwidth(p["repeats"]) if not p.get("quick") else (None, None)
    bw = max(copy_bw, read_bw) if copy_bw else None
    rows = []
    for i, ((d, n), m, keep) in enumerate((s, b, f) for s in p["shapes"] for b in p["batches"] for f in p["keeps"]):
        k = keep_count(d, 1.0 - keep) if keep < 1 else d
        kx, kw = jax.random.split(jax.random.key(i))
        x = jax.random.normal(kx, (m, d), jnp.float32)
        wf = jax.random.normal(kw, (d, n), jnp.float32) * d ** -0.5
        variants = _kernel_variants(x, wf, pack_ternary(wf), k, on_cpu, formulations=False)
        t = time_interleaved({name: (lambda f=f, a=a: f(*a)) for name, (f, a, _) in variants.items()}, (),
                             p["repeats"])
        for name, (_, _, nbytes) in variants.items():
            rows.append({"shape": f"{d}x{n}", "batch": m, "keep": keep, "variant": name, "ms": t[name] * 1e3,
                         "vs_dense_bf16": t[name] / t["dense bf16"], "weight_bytes": nbytes,
                         "roofline_ms": nbytes / bw * 1e3 if bw else None})
    return {"rows": rows, "copy_GBps": copy_bw and copy_bw / 1e9, "read_GBps": read_bw and read_bw / 1e9}


def _root() -> Path:
    return Path(__file__).resolve().parents[2]  # the repository (configs/), above qsparse_jax/bench/


def _cut_7b(p: dict, config: str, extra=()) -> list[str]:
    over = [f"model.n_layers={p['layers']}", f"data.seq_len={p['step_seq']}", f"data.batch_size={p['step_batch']}",
            f"model.max_seq_len={max(p['step_seq'], p['prompt'] + p['new_tokens'])}", "mesh.fsdp=-1"]
    return [*over, *(QUICK_MODEL if p.get("quick") else []), *extra]


def section_step(p: dict) -> dict:
    over = _cut_7b(p, "configs/7b-qsparse.yaml")
    cfgs = {"dense": load_config(str(_root() / "configs/7b-qsparse.yaml"),
                                 [*over, *(f"model.sparsity.{g}=0" for g in ("qkv", "out", "gate_up", "down"))]),
            "q-sparse": load_config(str(_root() / "configs/7b-qsparse.yaml"), over)}
    vocab = cfgs["dense"].model.vocab_size
    batch = np.random.default_rng(0).integers(0, vocab, (p["step_batch"], p["step_seq"] + 1), dtype=np.int32)
    compile_s = {}
    fns = step_runners(cfgs, batch)
    for name, run in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        compile_s[name] = time.perf_counter() - t0
    t = time_interleaved(fns, (), p["step_repeats"])
    tokens = p["step_batch"] * p["step_seq"]
    rows = [{"variant": name, "ms": t[name] * 1e3, "vs_dense": t[name] / t["dense"],
             "tokens_per_s": tokens / t[name], "tflops_dense_equiv": flops_per_token(cfgs[name]) * tokens / t[name] / 1e12,
             "first_step_s": compile_s[name]} for name in fns]
    m = cfgs["dense"].model
    return {"rows": rows, "shape": f"dim {m.dim}, hidden {m.hidden_dim}, heads {m.n_heads}, {m.n_layers} layers, "
                                   f"vocab {m.vocab_size}, batch {p['step_batch']} x {p['step_seq']}"}


def section_decode(p: dict) -> dict:
    from flax import nnx

    cfg = load_config(str(_root() / "configs/7b-bitnet-qsparse.yaml"), _cut_7b(p, "configs/7b-bitnet-qsparse.yaml"))
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    sp = cfg.model.sparsity
    prompt = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (p["decode_batch"], p["prompt"]))
    rows = []
    for name, sparsity, kernels in (("dense", SparsityConfig.uniform(0.0), "off"), ("sparse", sp, "off"),
                                    ("sparse + kernels", sp, "on")):
        apply, params = variant(model, sparsity, kernels)
        t0 = time.perf_counter()
        _, tm = generate(apply, params, cfg.model, prompt, p["new_tokens"], repeats=2)
        rows.append({"variant": name, "tokens_per_s": tm["tokens_per_s"], "prefill_ms": tm["prefill_s"] * 1e3,
                     "decode_ms_per_token": tm["decode_s"] / (p["new_tokens"] - 1) * 1e3,
                     "seconds": time.perf_counter() - t0})
    dense = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_dense"] = r["tokens_per_s"] / dense
    m = cfg.model
    return {"rows": rows, "shape": f"dim {m.dim}, hidden {m.hidden_dim}, {m.n_layers} layers, 1.58-bit weights, "
                                   f"batch {p['decode_batch']}, prompt {p['prompt']}, {p['new_tokens']} new tokens"}


def _ms(v) -> str:
    return "" if v is None else f"{v:.3f}"


def _markdown(rep: dict) -> str:
    d = rep["device"]
    out = [f"# bench all: {d['device_count']}x {d['device_kind']} ({d['backend']}), jax {d['jax']}, "
           f"python {d['python']}{' (--quick: smoke test, not a measurement)' if rep['quick'] else ''}", ""]
    for name in SECTIONS:
        sec = rep["sections"].get(name)
        if sec is None:
            continue
        out.append(f"## {name} ({sec.get('seconds', 0):.0f} s)")
        out.append("")
        if "skipped" in sec or "error" in sec:
            out += [f"{'skipped' if 'skipped' in sec else 'error'}: {sec.get('skipped') or sec.get('error')}", ""]
            continue
        if name == "checks":
            out += ["| check | ok | detail | s |", "|---|---|---|---|"]
            out += [f"| {r['check']} | {'yes' if r['ok'] else '**NO**'} | {r['detail']} | {r['seconds']} |"
                    for r in sec["rows"]]
        elif name == "kernels":
            if sec.get("copy_GBps"):
                out += [f"Copy {sec['copy_GBps']:.0f} GB/s (read + write), read {sec['read_GBps']:.0f} GB/s; "
                        f"roofline = weight bytes / the larger.", ""]
            out += ["| shape | batch | keep | variant | ms | vs dense bf16 | weight MB | roofline ms |",
                    "|---|---|---|---|---|---|---|---|"]
            out += [f"| {r['shape']} | {r['batch']} | {r['keep']:.0%} | {r['variant']} | {r['ms']:.3f} | "
                    f"{r['vs_dense_bf16']:.2f} | {r['weight_bytes'] / 1e6:.1f} | {_ms(r['roofline_ms'])} |"
                    for r in sec["rows"]]
        elif name == "step":
            out += [sec["shape"], "", "| variant | ms / step | vs dense | tokens/s | dense-equivalent TFLOP/s | "
                    "first step (compile) s |", "|---|---|---|---|---|---|"]
            out += [f"| {r['variant']} | {r['ms']:.1f} | {r['vs_dense']:.3f} | {r['tokens_per_s']:.0f} | "
                    f"{r['tflops_dense_equiv']:.1f} | {r['first_step_s']:.1f} |" for r in sec["rows"]]
        elif name == "decode":
            out += [sec["shape"], "", "| variant | tokens/s | vs dense | ms / token | prefill ms |",
                    "|---|---|---|---|---|"]
            out += [f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['vs_dense']:.3f} | {r['decode_ms_per_token']:.2f} | "
                    f"{r['prefill_ms']:.1f} |" for r in sec["rows"]]
        out.append("")
    out.append(f"Total {rep['seconds']:.0f} s; checks {'passed' if rep['ok'] else 'FAILED'}.")
    return "\n".join(out) + "\n"


def bench_all(args) -> int:
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        print(f"error: --sections takes a comma-separated subset of {','.join(SECTIONS)}, got {args.sections!r}",
              file=sys.stderr)
        return 2
    if args.budget_s <= 0 or (args.layers is not None and args.layers < 1):
        print(f"error: --budget_s and --layers must be positive, got {args.budget_s:g} and {args.layers}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    p = dict(QUICK if args.quick else FULL, quick=args.quick)
    if args.layers:
        p["layers"] = args.layers
    rep = {"device": _device_summary(), "quick": args.quick, "params": {k: v for k, v in p.items()}, "sections": {}}
    start = time.perf_counter()
    funcs = {"checks": section_checks, "kernels": section_kernels, "step": section_step, "decode": section_decode}
    for name in sections:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            rep["sections"][name] = {"skipped": f"budget of {args.budget_s:.0f} s spent ({elapsed:.0f} s)", "seconds": 0}
            continue
        print(f"bench all: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            rep["sections"][name] = funcs[name](p)
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others' numbers
            rep["sections"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                                     "traceback": traceback.format_exc()[-4000:]}
        rep["sections"][name]["seconds"] = time.perf_counter() - t0
    rep["seconds"] = time.perf_counter() - start
    rep["ok"] = all(s.get("ok", True) and "error" not in s for s in rep["sections"].values())
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    md = _markdown(rep)
    (out / "report.md").write_text(md)
    print(md, end="")
    return 0 if rep["ok"] else 1

