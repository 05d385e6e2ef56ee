"""LTE study at tiny scale (SEEDS §3, arXiv 2402.06126): dense vs LTE (ReLU², SiLU) vs MoEfication-style
routing vs Q-Sparse top-K at the FFN inputs, at ~50 % FFN sparsity; decode tokens/s LTE vs dense on CPU.

    python studies/lte/run.py [--out studies/lte/runs] [--results studies/lte] [--quick]

Per activation (relu2, silu): a dense base model trained from scratch (``BASE_STEPS``), then from it, each
for ``CONT_STEPS`` more steps at the same learning rate: the dense model continued; Q-Sparse top-K 50 % at
the FFN inputs (gate/up and down: half the FFN FLOPs; ReLU² only); LTE stage 1 (``STAGE1`` steps) for
three η, the η whose hard-routed sparsity is nearest 50 % continued by stage 2 (``STAGE2`` steps). The
MoEfication baseline fits routers to the dense base (no model training) and keeps the top-k experts with
k matching LTE's measured sparsity. Finished runs are skipped (their ``done.json``). Writes
``results.json`` and ``results.md`` (tables) into ``--results``.
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
ETAS = (0.05, 0.15, 0.5)
COMMON = ["model.n_layers=2", "model.dim=96", "model.hidden_dim=256", "model.n_heads=6", "model.max_seq_len=128",
          "data.seq_len=128", "data.batch_size=16", "train.log_every=50", "train.eval_every=100000",
          "train.eval_batches=8", "checkpoint.every=0", "checkpoint.keep=1"]
DENSE = ["model.sparsity.qkv=0", "model.sparsity.out=0", "model.sparsity.gate_up=0", "model.sparsity.down=0"]
CONT = ["optim.lr=2e-3", "optim.warmup_steps=10", "optim.schedule=cosine"]
# LTE variants at the chosen eta: (stage-1 steps, stage-2 steps, overrides for both stages, activations);
# the same 200 steps split differently, or a stronger separability loss
ABLATIONS = {"separability 1.0": (STAGE1, STAGE2, ["model.lte.separability=1.0"], ("relu2",)),
             "stage 2 twice as long": (STAGE1 - STAGE2, 2 * STAGE2, [], ("relu2", "silu")),
             "stage 2 three times as long": (STAGE1 - 2 * STAGE2, 3 * STAGE2, [], ("relu2",))}
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
            acc[k] = acc.get(k, 0.0) + np.asarray(v, np.float64)
    cfg = model.config
    res = {"val_loss": tot / n}
    ntok = sum(b[:, :-1].size for b in batches)
    if cfg.lte.enabled:
        summary, hist = lte_summary(cfg, acc)
        res.update(ffn_sparsity=summary["ffn_sparsity"], ffn_flops=summary["ffn_flops_per_token"],
                   active_experts=summary["active_experts"], hist=hist,
                   near_tau=summary["scores_within_0.05_of_tau"])
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "studies/lte/runs"))
    p.add_argument("--results", default=str(REPO / "studies/lte"))
    p.add_argument("--acts", nargs="+", default=["relu2", "silu"])
    p.add_argument("--quick", action="store_true", help="a few steps per run: checks the pipeline, not the method")
    args = p.parse_args(argv)
    if args.quick:
        global BASE_STEPS, CONT_STEPS, STAGE1, STAGE2, EVAL_BATCHES
        BASE_STEPS, CONT_STEPS, STAGE1, STAGE2, EVAL_BATCHES = 6, 4, 3, 2, 2
    import jax

    from qsparse_jax.config import LTEConfig
    from qsparse_jax.data.pipeline import load_splits, val_batches
    from qsparse_jax.nn.model import with_config
    from qsparse_jax.transforms.lte_convert import convert

    out, res_dir = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    results_path = res_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    t_start = time.time()
    base_cfg = cfg_for([])
    splits = load_splits(base_cfg.data)
    vb = [np.asarray(b) for b in val_batches(splits.val, base_cfg.data, EVAL_BATCHES)]

    def save():
        results_path.write_text(json.dumps(results, indent=1))

    for act in args.acts:
        a = [f"model.activation={act}"]
        R = results.setdefault(act, {})
        base = run_train(out, f"dense_{act}", a + [f"train.steps={BASE_STEPS}"])
        dense_model, _ = load(base)
        R["dense_base"] = evaluate(dense_model, vb)
        cont = run_train(out, f"dense_{act}_cont", a + CONT + [f"train.steps={CONT_STEPS}"], init_from=base / "checkpoints")
        R["dense"] = evaluate(load(cont)[0], vb)
        if act == "relu2":
            qs = run_train(out, f"qsparse_{act}", a + CONT + [f"train.steps={CONT_STEPS}", "model.sparsity.gate_up=0.5",
                                                               "model.sparsity.down=0.5"], init_from=base / "checkpoints")
            R["qsparse_topk"] = evaluate(load(qs)[0], vb)
        # dense -> experts grouped + routers
        lte0 = out / f"lte0_{act}"
        if not (lte0 / "checkpoints").is_dir():
            convert(str(lte0), ckpt=str(base / "checkpoints"), lte=LTEConfig(enabled=True, expert_size=EXPERT))
        sweep = {}
        for eta in ETAS:
            wd = run_train(out, f"lte1_{act}_eta{eta}", CONT + [f"train.steps={STAGE1}", f"model.lte.eta={eta}"],
                           init_from=lte0 / "checkpoints", cfg_path=lte0 / "config.yaml")
            sweep[str(eta)] = evaluate(hard(load(wd)[0]), vb)
        R["eta_sweep"] = sweep
        eta = min(ETAS, key=lambda e: abs(sweep[str(e)]["ffn_sparsity"] - 0.5))
        s1 = out / f"lte1_{act}_eta{eta}"
        s2 = run_train(out, f"lte2_{act}", CONT + [f"train.steps={STAGE2}", f"model.lte.eta={eta}", "model.lte.stage=2"],
                       init_from=s1 / "checkpoints", cfg_path=lte0 / "config.yaml")
        lte_model = load(s2)[0]
        R["lte"] = {**evaluate(lte_model, vb), "eta": eta}
        R["lte_stage1_only"] = {**sweep[str(eta)], "eta": eta}
        R["variation"] = variation(lte_model, vb[0][:, :-1])
        # MoEfication: routers fit to the dense base, top-k experts, k = LTE's measured active experts (rounded)
        E = base_cfg.model.hidden_dim // EXPERT
        k = max(1, round(R["lte"]["active_experts"]))
        moe0 = out / f"moe0_{act}"
        if not (moe0 / "checkpoints").is_dir():
            summary = convert(str(moe0), ckpt=str(base / "checkpoints"),
                                lte=LTEConfig(enabled=True, expert_size=EXPERT, mode="moefication", top_k=k))
            (moe0 / "fit.json").write_text(json.dumps(summary))
        moe_model, _ = load(moe0)
        moe_model = with_config(moe_model, lte=dataclasses.replace(moe_model.config.lte, top_k=k))
        R["moefication"] = {**evaluate(moe_model, vb), "top_k": k, "experts": E,
                            "router_topk_recall": json.loads((moe0 / "fit.json").read_text())["router_topk_recall"]}
        abl = R.setdefault("ablations", {})
        for j, (label, (n1, n2, extra, acts)) in enumerate(ABLATIONS.items()):
            if act in acts:
                w1 = run_train(out, f"lte1_{act}_abl{j}", CONT + [f"train.steps={n1}", f"model.lte.eta={eta}", *extra],
                               init_from=lte0 / "checkpoints", cfg_path=lte0 / "config.yaml")
                w2 = run_train(out, f"lte2_{act}_abl{j}", CONT + [f"train.steps={n2}", f"model.lte.eta={eta}",
                                                                  "model.lte.stage=2", *extra],
                               init_from=w1 / "checkpoints", cfg_path=lte0 / "config.yaml")
                abl[label] = {"stage1_only": evaluate(hard(load(w1)[0]), vb), "final": evaluate(load(w2)[0], vb),
                              "steps": [n1, n2]}
                save()
            R["decode"] = decode_speed(lte_model, vb[0][:1, :16])
        save()
        print(f"{act} done at {time.time() - t_start:.0f} s", flush=True)
    if "synthetic_decode" not in results:
        results["synthetic_decode"] = synthetic_speed(*((128, 512, 4) if args.quick else ()))
    results["wall_s_last_invocation"] = time.time() - t_start
    results["steps"] = {"base": BASE_STEPS, "cont": CONT_STEPS, "stage1": STAGE1, "stage2": STAGE2}
    results["device"] = str(jax.devices()[0].platform)
    save()
    write_md(results, res_dir / "results.md")
    return 0


def write_md(results: dict, path: Path):
    lines = []
    for act, R in results.items():
        if act not in ("relu2", "silu") or not isinstance(R, dict) or "dense" not in R:
            continue
        name = {"relu2": "ReLU²", "silu": "SiLU"}[act]
        lines += [f"### {name} GLU (2 layers, d 96, hidden 256 = 16 experts of 16)", "",
                  "| model | val loss (nats/byte) | FFN sparsity | FFN FLOPs/token | vs dense FFN FLOPs |",
                  "|---|---|---|---|---|"]
        st = results.get("steps", {"base": BASE_STEPS, "cont": CONT_STEPS, "stage1": STAGE1, "stage2": STAGE2})
        rows = [(f"dense base ({st['base']} steps)", R["dense_base"]), (f"dense, +{st['cont']} steps", R["dense"])]
        if "qsparse_topk" in R:
            rows.append((f"Q-Sparse top-K 50 % at gate/up and down inputs, +{st['cont']}", R["qsparse_topk"]))
        rows += [(f"LTE stage 1 only (η {R['lte']['eta']}, +{st['stage1']}), hard routing", R["lte_stage1_only"]),
                 (f"LTE stage 1 + 2 (η {R['lte']['eta']}, +{st['stage1']} + {st['stage2']})", R["lte"]),
                 (f"MoEfication (routers fit to the dense base, top-{R['moefication']['top_k']} of "
                  f"{R['moefication']['experts']})", R["moefication"])]
        for label, r in rows:
            lines.append(f"| {label} | {r['val_loss']:.4f} | {100 * r['ffn_sparsity']:.1f} % | {r['ffn_flops']:,.0f} | "
                         f"{r['ffn_flops'] / r['dense_ffn_flops']:.3f} |")
        lines += ["", f"η sweep (stage 1, {st['stage1']} steps, evaluated with hard routing):", "",
                  "| η | FFN sparsity | val loss | scores within 0.05 of τ |", "|---|---|---|---|"]
        for eta, r in R["eta_sweep"].items():
            lines.append(f"| {eta} | {100 * r['ffn_sparsity']:.1f} % | {r['val_loss']:.4f} | {100 * r['near_tau']:.1f} % |")
        for n, (label, r) in enumerate(R.get("ablations", {}).items()):
            if n == 0:
                lines += ["", f"LTE variants (η {R['lte']['eta']}; stage-1 + stage-2 steps; the main row above is "
                          f"{STAGE1} + {STAGE2}):", "",
                          "| LTE variant | steps | val loss after stage 1 (hard) | sparsity | val loss after stage 2 | "
                          "sparsity |", "|---|---|---|---|---|---|"]
            a, b = r["stage1_only"], r["final"]
            lines.append(f"| {label} | {r['steps'][0]} + {r['steps'][1]} | {a['val_loss']:.4f} | "
                         f"{100 * a['ffn_sparsity']:.1f} % | {b['val_loss']:.4f} | {100 * b['ffn_sparsity']:.1f} % |")
        v = R["variation"]
        lines += ["", "Sparsity by layer and token (LTE stage 2, one validation batch): " + "; ".join(
            f"layer {i}: mean {100 * m:.1f} %, token std {100 * s:.1f} pts, p10–p90 {100 * a:.0f}–{100 * b:.0f} %"
            for i, (m, s, a, b) in enumerate(zip(v["per_layer"], v["token_std"], v["token_p10"], v["token_p90"]))), ""]
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
