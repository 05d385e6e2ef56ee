"""LTE study at tiny scale (SEEDS §3, arXiv 2402.06126): dense vs LTE (ReLU², SiLU) vs MoEfication-style
routing vs Q-Sparse top-K at the FFN inputs, at ~50 % FFN sparsity, at equal training budgets, two seeds.

    python studies/lte/run.py [--out studies/lte/runs] [--results studies/lte] [--seeds 0 1] [--decode] [--quick]

Per activation (relu2, silu): one dense base model trained from scratch (``BASE_STEPS``). From it, per seed
(initialization and data order of this phase, the conversion's k-means/router seed, MoEfication's
calibration batches), each row gets ``CONT_STEPS`` more steps at the same learning rate: the dense model
continued; Q-Sparse top-K 50 % at the FFN inputs (gate/up and down: half the FFN FLOPs; ReLU² only); LTE
stage 1 + stage 2 for every split of the ``CONT_STEPS`` in ``SPLITS`` (declared before the runs, all
reported) at the η that the first seed's η search (stage 1, ``STAGE1`` steps, ``ETA_ORDER``, stopping in
``ETA_BAND``) puts nearest 50 % FFN sparsity. Order: the core rows (dense, Q-Sparse, the main split,
MoEfication) for every activation and seed first, then the other splits. MoEfication fits routers to the **continued dense model** (the same ``BASE_STEPS`` +
``CONT_STEPS``: equal budget; no training of its own) and keeps the top-k experts, k = the seed's
``STAGE1`` + ``STAGE2`` LTE model's active experts, rounded; the first seed also routes the dense base (the
earlier, unequal-budget baseline) for reference. Finished runs are skipped (their ``done.json``). Writes
``results.json`` and ``results.md`` (tables) into ``--results`` after every seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

BASE_STEPS, CONT_STEPS, STAGE1, STAGE2 = 500, 200, 150, 50
# η search (first seed, stage 1, hard routing): tried in this order (the earlier study's choice first),
# stopping at the first whose FFN sparsity is within ETA_BAND; the tried one nearest 50 % is used
ETA_ORDER = {"relu2": (0.05, 0.15, 0.5), "silu": (0.15, 0.05, 0.5)}
ETA_BAND = (0.40, 0.60)
SEEDS = (0, 1)
VERSION = 2  # results.json layout (1: the first, one-seed study)
# LTE stage-1 + stage-2 splits of the CONT_STEPS (all reported, every seed); the first is the main one
SPLITS = {"relu2": ((STAGE1, STAGE2), (100, 100), (50, 150)), "silu": ((STAGE1, STAGE2), (100, 100))}
COMMON = ["model.n_layers=2", "model.dim=96", "model.hidden_dim=256", "model.n_heads=6", "model.max_seq_len=128",
          "data.seq_len=128", "data.batch_size=16", "train.log_every=50", "train.eval_every=100000",
          "train.eval_batches=8", "checkpoint.every=0", "checkpoint.keep=1"]
DENSE = ["model.sparsity.qkv=0", "model.sparsity.out=0", "model.sparsity.gate_up=0", "model.sparsity.down=0"]
CONT = ["optim.lr=2e-3", "optim.warmup_steps=10", "optim.schedule=cosine"]
EXPERT = 16  # neurons per expert: 16 experts of the 256-neuron FFN (the paper's 32 would leave 8)
EVAL_BATCHES = 32  # 32 x 16 x 128 = 65k validation bytes


def cfg_for(over):
    from qsparse_jax.config import load_config

    return load_config(str(REPO / "configs/tiny.yaml"), COMMON + DENSE + list(over))


def run_train(out: Path, name: str, over, init_from=None, cfg_path=None) -> Path:
    from qsparse_jax.config import load_config
    from qsparse_jax.train.loop import train

    wd = out / name
    if (wd / "done.json").is_file():
        return wd
    cfg = load_config(str(cfg_path), list(over)) if cfg_path else cfg_for(over)
    t0 = time.time()
    m = train(cfg, wd, init_from=str(init_from) if init_from else None)
    if "stopped_at" in m:  # stopped by a signal: its checkpoint resumes on the next invocation
        sys.exit(f"{name}: stopped by a signal at step {m['stopped_at']}; run again to resume")
    (wd / "done.json").write_text(json.dumps({"wall_s": time.time() - t0, "loss": m.get("loss"),
                                              "lte": m.get("lte")}))
    return wd


def load(path):
    from flax import nnx

    from qsparse_jax.checkpoints.native import load_checkpoint_model

    cfg, params, graphdef = load_checkpoint_model(str(path / "checkpoints") if (path / "checkpoints").is_dir() else str(path))
    return nnx.merge(graphdef, params), cfg


def evaluate(model, batches) -> dict:
    """Validation NLL (nats/byte), FFN sparsity and FFN FLOPs per token (measured on the validation tokens)."""
    import jax

    from qsparse_jax.nn.lte import ffn_flops_per_token, lte_summary
    from qsparse_jax.nn.model import functional, nll_sum

    apply, params = functional(model)
    f = jax.jit(lambda p, t: apply(p, t, return_stats=True))
    tot = n = 0.0
    acc: dict = {}
    for b in batches:
        logits, st = f(params, b[:, :-1])
        s, c = nll_sum(logits, b[:, 1:])
        tot, n = tot + float(s), n + float(c)
        for k, v in st.items():
            if k == "by_layer":  # per-layer vectors [n_layers]: summed over batches, kept per layer
                bl = acc.setdefault("by_layer", {})
                for kk, vv in v.items():
                    if kk != "hidden":
                        bl[kk] = bl.get(kk, 0.0) + np.asarray(vv, np.float64)
            else:
                acc[k] = acc.get(k, 0.0) + np.asarray(v, np.float64)
    cfg = model.config
    res = {"val_loss": tot / n}
    ntok = sum(b[:, :-1].size for b in batches)
    if cfg.lte.enabled:
        summary, hist = lte_summary(cfg, acc)
        res.update(ffn_sparsity=summary["ffn_sparsity"], ffn_flops=summary["ffn_flops_per_token"],
                   active_experts=summary["active_experts"], hist=hist,
                   near_tau=summary["scores_within_0.05_of_tau"],
                   ffn_sparsity_by_layer=[summary[f"ffn_sparsity_layer{l}"] for l in range(cfg.n_layers)
                                          if f"ffn_sparsity_layer{l}" in summary])
    else:
        sp = {"gate_up": float(acc["gate_up"]) / (ntok * cfg.n_layers * cfg.dim),
              "down": float(acc["down"]) / (ntok * cfg.n_layers * cfg.hidden_dim)}
        topk = cfg.sparsity.gate_up > 0 or cfg.sparsity.down > 0
        res.update(ffn_sparsity=(1 - (4 * (1 - sp["gate_up"]) + 2 * (1 - sp["down"])) / 6) if topk else 0.0,
                   ffn_flops=ffn_flops_per_token(cfg, sparsity=sp if topk else None),
                   down_input_zeros=sp["down"])
    res["dense_ffn_flops"] = ffn_flops_per_token(cfg)
    return res


def hard(model):
    """An LTE model evaluated the way it is served: hard selection (stage 2's G > τ)."""
    from qsparse_jax.nn.model import with_config

    return with_config(model, lte=dataclasses.replace(model.config.lte, stage=2))


def variation(model, tokens) -> dict:
    """Per-layer FFN sparsity and the spread of per-token sparsity (claim: it varies by layer and token)."""
    from qsparse_jax.analysis.lte_probes import token_sparsity

    per_tok = token_sparsity(hard(model), tokens)  # [layers, tokens]
    return {"per_layer": [float(x) for x in per_tok.mean(1)], "token_std": [float(x) for x in per_tok.std(1)],
            "token_p10": [float(x) for x in np.percentile(per_tok, 10, axis=1)],
            "token_p90": [float(x) for x in np.percentile(per_tok, 90, axis=1)]}


def decode_speed(model, prompt, new_tokens=64, repeats=5) -> dict:
    """Decode tokens/s at batch 1: LTE reading only the selected experts (gather) vs the same weights dense."""
    from qsparse_jax.infer.generate import generate
    from qsparse_jax.infer.variants import decode_union, dense_variant, with_execution
    from qsparse_jax.nn.model import functional

    out = {}
    for name, m in (("dense", dense_variant(model)), ("lte", with_execution(hard(model), "gather")),
                    ("dense_again", dense_variant(model))):
        apply, params = functional(m)
        toks, t = generate(apply, params, m.config, prompt, new_tokens, repeats=repeats)
        out[name] = t["tokens_per_s"]
        if name == "lte":
            out["union"] = decode_union(hard(model), toks)
    out["dense"] = max(out["dense"], out.pop("dense_again"))  # the better of two dense timings (noise)
    out["speedup"] = out["lte"] / out["dense"]
    return out


def synthetic_speed(dim=1024, hidden=2816, new_tokens=32) -> dict:
    """The same comparison on a random LTE model of a larger FFN (routers scaled so ~half the experts run)."""
    import jax
    from flax import nnx

    from qsparse_jax.config import LTEConfig, ModelConfig
    from qsparse_jax.nn.model import Transformer

    cfg = ModelConfig(vocab_size=256, dim=dim, n_layers=2, n_heads=8, hidden_dim=hidden, max_seq_len=128,
                      lte=LTEConfig(enabled=True, expert_size=32, stage=2))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for layer in model.layers:
        layer.mlp.router[...] = layer.mlp.router[...] * 30
    prompt = np.asarray(jax.random.randint(jax.random.key(0), (1, 8), 0, 256))
    return {**decode_speed(model, prompt, new_tokens), "dim": dim, "hidden": hidden}


def seed_over(seed: int) -> list[str]:
    """Initialization and data order of the +200-step phase (and of MoEfication's calibration batches)."""
    return [f"train.seed={seed}", f"data.seed={seed}"]


def run_seed(act: str, seed: int, out: Path, vb, R: dict, extras: bool = False):
    """One seed of the +CONT_STEPS rows of ``act`` (from the one dense base), into ``R["seeds"][seed]``:
    the core rows (dense, Q-Sparse, the main LTE split, MoEfication), or with ``extras`` the other splits
    (and, first seed, the stronger separability loss). Finished runs and evaluations are not redone."""
    from qsparse_jax.config import LTEConfig
    from qsparse_jax.transforms.lte_convert import convert

    a, so = [f"model.activation={act}"], seed_over(seed)
    base = out / f"dense_{act}"
    S = R.setdefault("seeds", {}).setdefault(str(seed), {})

    def ev(d: dict, key: str, model_fn):
        if key not in d:
            d[key] = model_fn()
        return d[key]

    cont = run_train(out, f"dense_{act}_cont_s{seed}", a + CONT + so + [f"train.steps={CONT_STEPS}"],
                     init_from=base / "checkpoints")
    ev(S, "dense", lambda: evaluate(load(cont)[0], vb))
    if act == "relu2":
        qs = run_train(out, f"qsparse_{act}_s{seed}", a + CONT + so + [f"train.steps={CONT_STEPS}",
                       "model.sparsity.gate_up=0.5", "model.sparsity.down=0.5"], init_from=base / "checkpoints")
        ev(S, "qsparse_topk", lambda: evaluate(load(qs)[0], vb))
    # dense base -> experts grouped (balanced k-means, seeded) + routers
    lte0 = out / f"lte0_{act}_s{seed}"
    if not (lte0 / "checkpoints").is_dir():
        convert(str(lte0), ckpt=str(base / "checkpoints"), lte=LTEConfig(enabled=True, expert_size=EXPERT), seed=seed)
    lte_args = dict(cfg_path=lte0 / "config.yaml")
    if "eta" not in R:  # η search on the first seed, in ETA_ORDER, stopping at the first within ETA_BAND
        sweep = R.setdefault("eta_sweep", {})
        for eta in ETA_ORDER[act]:
            wd = run_train(out, f"lte1_{act}_eta{eta}_s{seed}", CONT + so + [f"train.steps={STAGE1}",
                           f"model.lte.eta={eta}"], init_from=lte0 / "checkpoints", **lte_args)
            ev(sweep, str(eta), lambda: evaluate(hard(load(wd)[0]), vb))
            if ETA_BAND[0] <= sweep[str(eta)]["ffn_sparsity"] <= ETA_BAND[1]:
                break
        R["eta"] = float(min(sweep, key=lambda e: abs(sweep[e]["ffn_sparsity"] - 0.5)))
        R["eta_seed"] = seed
    eta = R["eta"]
    splits = S.setdefault("lte", {})
    for n1, n2 in SPLITS[act] if extras else SPLITS[act][:1]:
        reuse = n1 == STAGE1 and seed == R["eta_seed"]
        name1 = f"lte1_{act}_eta{eta}_s{seed}" if reuse else f"lte1_{act}_{n1}_s{seed}"
        w1 = run_train(out, name1, CONT + so + [f"train.steps={n1}", f"model.lte.eta={eta}"],
                       init_from=lte0 / "checkpoints", **lte_args)
        w2 = run_train(out, f"lte2_{act}_{n1}+{n2}_s{seed}", CONT + so + [f"train.steps={n2}", f"model.lte.eta={eta}",
                       "model.lte.stage=2"], init_from=w1 / "checkpoints", **lte_args)
        if f"{n1}+{n2}" not in splits:
            final = load(w2)[0]
            splits[f"{n1}+{n2}"] = {"stage1_only": evaluate(hard(load(w1)[0]), vb), "final": evaluate(final, vb),
                                    "variation": variation(final, vb[0][:, :-1]), "steps": [n1, n2]}
    # MoEfication at equal budget: routers fit to the dense model after the same 500 + 200 steps (this
    # seed's continuation), top-k experts, k = this seed's main-split LTE active experts (rounded)
    k = max(1, round(splits[f"{STAGE1}+{STAGE2}"]["final"]["active_experts"]))
    ev(S, "moefication", lambda: moefication(out / f"moe_{act}_s{seed}", cont, k, seed, vb))
    if seed == SEEDS[0]:  # the previous study's unequal-budget baseline (routes the 500-step base), for reference
        ev(R, "moefication_base", lambda: moefication(out / f"moe0_{act}", base, k, seed, vb))
        if extras and act == "relu2":  # a stronger separability loss (one seed: no claim rests on it)
            w1 = run_train(out, f"lte1_{act}_sep1_s{seed}", CONT + so + [f"train.steps={STAGE1}", f"model.lte.eta={eta}",
                           "model.lte.separability=1.0"], init_from=lte0 / "checkpoints", **lte_args)
            w2 = run_train(out, f"lte2_{act}_sep1_s{seed}", CONT + so + [f"train.steps={STAGE2}", f"model.lte.eta={eta}",
                           "model.lte.stage=2", "model.lte.separability=1.0"], init_from=w1 / "checkpoints", **lte_args)
            ev(R, "separability_1", lambda: {"stage1_only": evaluate(hard(load(w1)[0]), vb),
                                             "final": evaluate(load(w2)[0], vb), "steps": [STAGE1, STAGE2]})


def moefication(wd: Path, source: Path, k: int, seed: int, vb) -> dict:
    """MoEfication: experts grouped and routers fit (Adam, BCE) to ``source``'s top-k experts by activation
    norm on 8 training batches; no model training; top-k routing at inference."""
    from qsparse_jax.config import LTEConfig
    from qsparse_jax.nn.model import with_config
    from qsparse_jax.transforms.lte_convert import convert

    if not (wd / "checkpoints").is_dir():
        summary = convert(str(wd), ckpt=str(source / "checkpoints"), seed=seed,
                          lte=LTEConfig(enabled=True, expert_size=EXPERT, mode="moefication", top_k=k))
        (wd / "fit.json").write_text(json.dumps(summary))
    model, cfg = load(wd)
    model = with_config(model, lte=dataclasses.replace(model.config.lte, top_k=k))
    return {**evaluate(model, vb), "top_k": k, "experts": cfg.model.hidden_dim // EXPERT,
            "router_topk_recall": json.loads((wd / "fit.json").read_text())["router_topk_recall"]}


def main(argv=None) -> int:
    global BASE_STEPS, CONT_STEPS, STAGE1, STAGE2, EVAL_BATCHES, SPLITS, SEEDS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "studies/lte/runs"))
    p.add_argument("--results", default=str(REPO / "studies/lte"))
    p.add_argument("--acts", nargs="+", default=["relu2", "silu"])
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS),
                   help="seeds of the +200-step phase (the first one also runs the η sweep and the one-seed rows)")
    p.add_argument("--decode", action="store_true",
                   help="also time decoding (batch 1, CPU) of the first seed's main LTE model and a random larger one")
    p.add_argument("--quick", action="store_true", help="a few steps per run: checks the pipeline, not the method")
    args = p.parse_args(argv)
    SEEDS = tuple(args.seeds)
    if args.quick:
        BASE_STEPS, CONT_STEPS, STAGE1, STAGE2, EVAL_BATCHES = 6, 4, 3, 1, 2
        SPLITS = {"relu2": ((3, 1), (2, 2)), "silu": ((3, 1),)}
    import jax

    from qsparse_jax.data.pipeline import load_splits, val_batches

    out, res_dir = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    results_path = res_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("version") != VERSION:  # an earlier study's layout: start afresh
        results = {"version": VERSION}
    t_start = time.time()
    base_cfg = cfg_for([])
    splits = load_splits(base_cfg.data)
    vb = [np.asarray(b) for b in val_batches(splits.val, base_cfg.data, EVAL_BATCHES)]

    def save():
        results["steps"] = {"base": BASE_STEPS, "cont": CONT_STEPS, "stage1": STAGE1, "stage2": STAGE2,
                            "splits": {a: [list(s) for s in SPLITS[a]] for a in SPLITS}}
        results["device"] = str(jax.devices()[0].platform)
        results_path.write_text(json.dumps(results, indent=1))
        write_md(results, res_dir / "results.md")

    for act in args.acts:
        R = results.setdefault(act, {})
        base = run_train(out, f"dense_{act}", [f"model.activation={act}", f"train.steps={BASE_STEPS}"])
        R["dense_base"] = evaluate(load(base)[0], vb)
        for seed in SEEDS:
            run_seed(act, seed, out, vb, R)
            save()
            print(f"{act} seed {seed}: core rows done at {time.time() - t_start:.0f} s", flush=True)
    for act in args.acts:  # then the other LTE splits (and the one-seed variant), every seed
        R = results[act]
        for seed in SEEDS:
            run_seed(act, seed, out, vb, R, extras=True)
            save()
            print(f"{act} seed {seed}: every row done at {time.time() - t_start:.0f} s", flush=True)
        if args.decode:
            main_model = load(out / f"lte2_{act}_{STAGE1}+{STAGE2}_s{SEEDS[0]}")[0]
            R["decode"] = decode_speed(main_model, vb[0][:1, :16])
            save()
    if args.decode and "synthetic_decode" not in results:
        results["synthetic_decode"] = synthetic_speed(*((128, 512, 4) if args.quick else ()))
    results["wall_s_last_invocation"] = time.time() - t_start
    save()
    return 0


def _stat(vals):
    """(mean, half the seed range) of a list of numbers."""
    return float(np.mean(vals)), (max(vals) - min(vals)) / 2 if len(vals) > 1 else float("nan")


def write_md(results: dict, path: Path):
    """Per activation: every row per seed, its mean and seed spread; the gap of each routed row to its own
    dense reference per seed; the η sweep; the per-layer / per-token sparsity of each LTE model."""
    lines = ["Seed s = initialization and data order of the +200-step phase, k-means/router seed of the "
             "conversion and MoEfication's calibration batches (every row starts from the same dense base). "
             "± = half the range over seeds.", ""]
    st = results.get("steps", {"base": BASE_STEPS, "cont": CONT_STEPS, "stage1": STAGE1, "stage2": STAGE2})
    for act in ("relu2", "silu"):
        R = results.get(act)
        if not isinstance(R, dict) or not R.get("seeds"):
            continue
        seeds = sorted(R["seeds"], key=int)
        name = {"relu2": "ReLU²", "silu": "SiLU"}[act]
        lines += [f"### {name} GLU (2 layers, d 96, hidden 256 = 16 experts of 16)", "",
                  "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± | FFN sparsity (per seed) | "
                  "vs dense FFN FLOPs (per seed) |",
                  "|---|" + "---|" * len(seeds) + "---|---|---|"]

        def row(label, get):
            rs = [get(R["seeds"][s]) for s in seeds]
            if all(r is None for r in rs):
                return
            v = [r["val_loss"] for r in rs if r is not None]
            m, h = _stat(v)
            sp = " / ".join(f"{100 * r['ffn_sparsity']:.1f}" for r in rs if r is not None)
            fl = " / ".join(f"{r['ffn_flops'] / r['dense_ffn_flops']:.3f}" for r in rs if r is not None)
            lines.append(f"| {label} | " + " | ".join(f"{r['val_loss']:.4f}" if r else "" for r in rs)
                         + f" | {m:.4f}" + (f" ± {h:.4f}" if h == h else "") + f" | {sp} % | {fl} |")

        db = R["dense_base"]
        lines.append(f"| dense base ({st['base']} steps, one run) | " + " | ".join([f"{db['val_loss']:.4f}"] +
                     [""] * (len(seeds) - 1)) + f" | {db['val_loss']:.4f} | 0.0 % | 1.000 |")
        row(f"dense, +{st['cont']} steps", lambda S: S.get("dense"))
        row(f"Q-Sparse top-K 50 % at gate/up and down inputs, +{st['cont']}", lambda S: S.get("qsparse_topk"))
        split_names = list(dict.fromkeys(sp for s in seeds for sp in R["seeds"][s].get("lte", {})))
        for sp in split_names:
            n1, n2 = sp.split("+")
            row(f"LTE η {R['eta']}, stage 1 only (+{n1}), hard routing", lambda S, sp=sp: S.get("lte", {}).get(sp, {}).get("stage1_only"))
            row(f"LTE η {R['eta']}, stage 1 + 2 (+{n1} + {n2})", lambda S, sp=sp: S.get("lte", {}).get(sp, {}).get("final"))
        k = " / ".join(str(R["seeds"][s]["moefication"]["top_k"]) for s in seeds if "moefication" in R["seeds"][s])
        row(f"MoEfication, routes the dense model after {st['base']} + {st['cont']} steps (top-{k} of 16: the "
            f"seed's 150 + 50 LTE active experts)",
            lambda S: S.get("moefication"))
        if "moefication_base" in R:
            r = R["moefication_base"]
            lines.append(f"| MoEfication, routes the dense base ({st['base']} steps; unequal budget, one run) | "
                         + " | ".join([f"{r['val_loss']:.4f}"] + [""] * (len(seeds) - 1))
                         + f" | {r['val_loss']:.4f} | {100 * r['ffn_sparsity']:.1f} % | "
                         f"{r['ffn_flops'] / r['dense_ffn_flops']:.3f} |")
        lines += ["", f"Gap to the same seed's dense +{st['cont']} model (same total steps; positive: worse):", "",
                  "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± |", "|---|" + "---|" * (len(seeds) + 1)]

        def gap(label, get):
            g = [get(R["seeds"][s])["val_loss"] - R["seeds"][s]["dense"]["val_loss"]
                 if get(R["seeds"][s]) is not None and "dense" in R["seeds"][s] else None for s in seeds]
            if any(x is not None for x in g):
                m, h = _stat([x for x in g if x is not None])
                lines.append(f"| {label} | " + " | ".join(f"{x:+.4f}" if x is not None else "" for x in g)
                             + f" | {m:+.4f}" + (f" ± {h:.4f}" if h == h else "") + " |")

        gap("Q-Sparse top-K 50 %", lambda S: S.get("qsparse_topk"))
        for sp in split_names:
            gap(f"LTE {sp}", lambda S, sp=sp: S.get("lte", {}).get(sp, {}).get("final"))
        gap("MoEfication (equal budget)", lambda S: S.get("moefication"))
        lines += ["", f"η search (seed {R.get('eta_seed', seeds[0])}, stage 1, {st['stage1']} steps, hard routing; "
                  f"stopped at the first η within {100 * ETA_BAND[0]:.0f}–{100 * ETA_BAND[1]:.0f} %):", "",
                  "| η | FFN sparsity | val loss | scores within 0.05 of τ |", "|---|---|---|---|"]
        for eta, r in R.get("eta_sweep", {}).items():
            lines.append(f"| {eta} | {100 * r['ffn_sparsity']:.1f} % | {r['val_loss']:.4f} | {100 * r['near_tau']:.1f} % |")
        if "separability_1" in R:
            a, b = R["separability_1"]["stage1_only"], R["separability_1"]["final"]
            lines += ["", f"Separability weight 1.0 instead of 0.1 (seed {seeds[0]}, {st['stage1']} + {st['stage2']}): "
                      f"after stage 1 (hard) {a['val_loss']:.4f} at {100 * a['ffn_sparsity']:.1f} %, after stage 2 "
                      f"{b['val_loss']:.4f} at {100 * b['ffn_sparsity']:.1f} %."]
        lines += ["", "FFN sparsity by layer (all 65k validation tokens) and by token (one validation batch of "
                  "2,048 tokens), LTE after stage 2:", "",
                  "| LTE model | seed | by layer (0 / 1), all validation | layer 0 (one batch): mean, token std, p10–p90 | "
                  "layer 1 (one batch): mean, token std, p10–p90 |", "|---|---|---|---|---|"]
        for sp in split_names:
            for s in seeds:
                r = R["seeds"][s].get("lte", {}).get(sp, {})
                v = r.get("variation")
                if v:
                    by = r.get("final", {}).get("ffn_sparsity_by_layer") or []
                    lines.append(f"| {sp} | {s} | " + " / ".join(f"{100 * x:.1f} %" for x in by) + " | " + " | ".join(
                        f"{100 * m:.1f} %, {100 * d:.1f} pts, {100 * a:.0f}–{100 * b:.0f} %"
                        for m, d, a, b in zip(v["per_layer"], v["token_std"], v["token_p10"], v["token_p90"])) + " |")
        lines.append("")
        if "decode" in R:
            d = R["decode"]
            lines += [f"Decode at batch 1 on CPU (this model): dense {d['dense']:.0f} tok/s, LTE (selected experts only) "
                      f"{d['lte']:.0f} tok/s, ratio {d['speedup']:.2f}; experts read per step "
                      f"{d['union']['union_per_step']:.2f} of {d['union']['experts']}.", ""]
    if "synthetic_decode" in results:
        d = results["synthetic_decode"]
        lines += [f"Decode at batch 1 on CPU, random 2-layer model d {d['dim']} / hidden {d['hidden']} "
                  f"({d['union']['experts']} experts of 32), routers scaled so about half run: dense "
                  f"{d['dense']:.0f} tok/s, LTE {d['lte']:.0f} tok/s, ratio {d['speedup']:.2f}; experts read per step "
                  f"{d['union']['union_per_step']:.1f} of {d['union']['experts']}.", ""]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
