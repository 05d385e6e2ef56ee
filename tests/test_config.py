"""The config tree: YAML + dotted overrides, validation, shipped configs, schedules."""

from pathlib import Path

import numpy as np
import pytest

from qsparse_jax.config import Config, OptimConfig, load_config
from qsparse_jax.errors import ConfigError
from qsparse_jax.train.optim import lr_schedule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


# The fields that make each recipe what its name says (dotted path -> value). A new config must add a row.
_SIZES = {"300m": (1024, 24), "700m": (1536, 24), "1.3b": (2048, 24), "7b": (4096, 32)}
_QWEN2_7B = {"model.dim": 3584, "model.n_layers": 28, "model.hidden_dim": 18944, "model.n_heads": 28,
             "model.n_kv_heads": 4, "model.vocab_size": 152064, "model.rope_theta": 1e6, "model.qkv_bias": True,
             "model.sliding_window": None, "model.norm_eps": 1e-6, "model.sparsity.down": 0.604}
RECIPES = {
    "tiny": {"model.dim": 256, "model.n_layers": 4, "model.activation": "relu2", "model.sparsity.qkv": 0.3,
             "data.source": "stdlib", "train.steps": 300},
    "ast-tiny": {"model.weight_sparsity.n": 2, "model.weight_sparsity.m": 4, "model.weight_sparsity.mask_every": 10,
                 "model.sparsity.qkv": 0.3, "optim.weight_decay": 0.0},
    "ast-llama2-7b": {"model.dim": 4096, "model.hidden_dim": 11008, "model.activation": "silu",
                      "model.weight_sparsity.n": 2, "model.weight_sparsity.m": 4, "model.weight_sparsity.decay_max": 6e-5,
                      "optim.lr": 2e-5, "model.weight_sparsity.slorb": True, "model.weight_sparsity.slorb_group": 16,
                      "model.weight_sparsity.slorb_train_x": True, "model.weight_sparsity.score": "magnitude",
                      "model.weight_sparsity.decay_after_clip": True, "train.distill.squarehead": 0.0},
    "lte-tiny-stage1": {"model.lte.enabled": True, "model.lte.stage": 1, "model.lte.expert_size": 32},
    "lte-tiny-stage2": {"model.lte.enabled": True, "model.lte.stage": 2, "model.lte.expert_size": 32},
    "mistral-7b-continued-qsparse": {"model.hidden_dim": 14336, "model.n_kv_heads": 8, "model.sliding_window": 4096},
    "mistral-7b-openorca-qsparse": {"model.hidden_dim": 14336, "data.task": "sft", "model.sparsity.down": 0.604,
                                    "train.epochs": 1},
    "qwen2-7b-continued-qsparse": {**_QWEN2_7B, "data.batch_size": 2048, "optim.lr": 5e-5, "optim.weight_decay": 0.01},
    "qwen2-7b-openorca-qsparse": {**_QWEN2_7B, "data.task": "sft", "train.epochs": 1, "optim.warmup_fraction": 0.03},
}
for _size, (_dim, _layers) in _SIZES.items():
    RECIPES[f"{_size}-dense"] = {"model.dim": _dim, "model.n_layers": _layers, "model.sparsity.enabled": False}
    RECIPES[f"{_size}-qsparse"] = {"model.dim": _dim, "model.n_layers": _layers, "model.sparsity.qkv": 0.3,
                                   "model.sparsity.block_size": None}
    RECIPES[f"{_size}-block"] = {"model.dim": _dim, "model.sparsity.block_size": 32}
    RECIPES[f"{_size}-bitnet-qsparse"] = {"model.dim": _dim, "model.weight_bits": "1.58", "model.act_bits": 8}


def _field(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_is_the_recipe_its_name_says(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    assert path.stem in RECIPES, f"configs/{path.name}: add its key fields to RECIPES"
    for dotted, want in RECIPES[path.stem].items():
        assert _field(cfg, dotted) == want, f"{path.name}: {dotted} = {_field(cfg, dotted)!r}, expected {want!r}"


def test_paper_configs_carry_the_papers_hyperparameters():
    lrs = {"300m": 6e-4, "700m": 2.5e-4, "1.3b": 2e-4, "7b": 1.5e-4}
    for size, lr in lrs.items():
        dense, qs = load_config(f"configs/{size}-dense.yaml"), load_config(f"configs/{size}-qsparse.yaml")
        assert dense.optim.lr == qs.optim.lr == lr and qs.optim.weight_decay == 0.1
        assert (qs.optim.b1, qs.optim.b2) == (0.9, 0.95)
        assert qs.model.keep("qkv") == int(0.7 * qs.model.dim) and not dense.model.sparsity.enabled
        block = load_config(f"configs/{size}-block.yaml").model
        assert block.sparsity.block_size == 32 and block.keep("down") == 16
        bit = load_config(f"configs/{size}-bitnet-qsparse.yaml")
        assert bit.model.weight_bits == "1.58" and bit.model.act_bits == 8 and bit.optim.schedule == "two_stage"
        assert bit.optim.weight_decay == 0.1 and bit.optim.weight_decay2 == 0.0
    seven = load_config("configs/7b-qsparse.yaml").model
    assert (seven.dim, seven.hidden_dim, seven.n_heads, seven.n_layers) == (4096, 11008, 32, 32)


def test_overrides_are_typed_and_nested():
    cfg = load_config("configs/tiny.yaml", ["optim.lr=1e-3", "model.weight_bits=1.58", "model.sparsity.block_size=32",
                                            "optim.clip_norm=null", "train.steps=7"])
    assert cfg.optim.lr == 1e-3 and cfg.model.weight_bits == "1.58" and cfg.model.sparsity.block_size == 32
    assert cfg.optim.clip_norm is None and cfg.train.steps == 7


def test_on_and_off_are_words_for_string_keys_and_booleans_for_bool_keys(tmp_path):
    """YAML 1.1 reads on / off / yes / no as booleans: ``model.kernels=on`` was refused as "must be a str, got
    True". Only true / false are booleans now; a bool key still takes the other words, in overrides and files."""
    bitnet = ["model.weight_bits=1.58", "model.act_bits=8"]
    assert load_config("configs/tiny.yaml", [*bitnet, "model.kernels=on"]).model.kernels == "on"
    assert load_config("configs/tiny.yaml", [*bitnet, "model.kernels=off"]).model.kernels == "off"
    for word, value in (("no", False), ("off", False), ("false", False), ("yes", True), ("On", True), ("true", True)):
        assert load_config("configs/tiny.yaml", [f"checkpoint.async_save={word}"]).checkpoint.async_save is value
    f = tmp_path / "c.yaml"
    f.write_text("model: {weight_bits: 1.58, act_bits: 8, kernels: on, tie_embeddings: yes}\n"
                 "checkpoint: {async_save: off}\n")
    cfg = load_config(str(f))
    assert cfg.model.kernels == "on" and cfg.model.tie_embeddings is True and cfg.checkpoint.async_save is False


@pytest.mark.parametrize("override,msg", [
    ("modle.dim=3", "unknown config key 'modle'"),
    ("model.sparsity.qvk=0.1", "unknown config key 'model.sparsity.qvk'"),
    ("train.steps=1.5", "train.steps must be an int, got 1.5"),
    ("checkpoint.async_save=maybe", "checkpoint.async_save must be a bool, got 'maybe'"),
    ("mesh={data: -1, fsdp: -1}", "at most one mesh axis may be -1"),
    ("nokey", "must look like key=value"),
    ("data.seq_len=4096", "data.seq_len=4096 exceeds model.max_seq_len=256"),
    ("optim.schedule=two_stage", "optim.lr2 must be set for schedule two_stage"),
])
def test_bad_overrides_name_the_key(override, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")) as e:
        load_config("configs/tiny.yaml", [override])
    assert "\n" not in str(e.value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "none.yaml"))
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def test_two_stage_schedule_switches_peak_and_weight_decay():
    o = OptimConfig(lr=1.8e-3, lr2=1.5e-3, schedule="two_stage", warmup_steps=10, stage2_at=0.5, end_lr_ratio=0.1,
                    weight_decay=0.1, weight_decay2=0.0)
    f = lr_schedule(o, 100)
    assert float(f(0)) == 0.0 and np.isclose(float(f(10)), 1.8e-3)
    assert float(f(49)) < 1.8e-3 and np.isclose(float(f(50)), 1.5e-3)
    assert np.isclose(float(f(100)), 1.5e-4, rtol=1e-3)
    from qsparse_jax.train.optim import wd_schedule
    wd = wd_schedule(o, 100)
    assert np.isclose(float(wd(49)), 0.1) and float(wd(50)) == 0.0


def test_mistral_continued_training_config_reproduces_the_papers_activated_parameters():
    from qsparse_jax.nn.model import activated_params

    cfg = load_config("configs/mistral-7b-continued-qsparse.yaml")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_norm, cfg.optim.warmup_steps) == (5e-5, 0.01, 2.0, 375)
    assert np.isclose(cfg.optim.lr * cfg.optim.end_lr_ratio, 1e-6)
    assert cfg.data.batch_size * cfg.data.seq_len == 4 * 2**20  # 4M tokens per batch
    sp = cfg.model.sparsity
    r = activated_params(cfg.model, {"qkv": sp.qkv, "out": sp.out, "up": sp.gate_up, "gate": sp.gate_up, "down": sp.down})
    assert abs(r["overall"] - 0.457) < 5e-4 and abs(r["N_a"] / 1e9 - 3.8) < 0.05


def test_openorca_fine_tuning_config_is_one_epoch_cosine_with_3_percent_warmup():
    from qsparse_jax.train.optim import lr_schedule

    cfg = load_config("configs/mistral-7b-openorca-qsparse.yaml")
    assert cfg.data.task == "sft" and cfg.train.epochs == 1 and cfg.optim.schedule == "cosine"
    assert cfg.model.sparsity == load_config("configs/mistral-7b-continued-qsparse.yaml").model.sparsity
    f = lr_schedule(cfg.optim, 1000)  # steps come from the data at run time; warmup is 3 % of them
    assert float(f(29)) < cfg.optim.lr and np.isclose(float(f(30)), cfg.optim.lr) and float(f(1000)) < 1e-9


@pytest.mark.parametrize("recipe", ["continued", "openorca"])
def test_qwen2_configs_are_the_mistral_recipes_on_the_model_qwen2_7b_imports_as(recipe):
    """The model section is what import-hf makes of Qwen2-7B's config.json (checkpoints/hf_config.py) plus
    the Mistral recipe's top-K; everything but the model is the Mistral recipe's."""
    from dataclasses import replace

    from qsparse_jax.checkpoints.hf_config import config_from_hf

    qwen2_7b = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "hidden_act": "silu",
                "tie_word_embeddings": False, "sliding_window": 131072, "use_sliding_window": False}
    qwen, mistral = (load_config(f"configs/{m}-7b-{recipe}-qsparse.yaml") for m in ("qwen2", "mistral"))
    compute = {k: getattr(qwen.model, k) for k in ("sparsity", "dtype", "param_dtype", "remat")}
    assert qwen.model.head_size == 128  # 3584 / 28: derived here, written out by the import
    assert qwen.model == config_from_hf(qwen2_7b).replace(head_dim=None, **compute)
    assert qwen.model.sparsity == mistral.model.sparsity
    assert (qwen.data, qwen.optim, qwen.train) == (replace(mistral.data, tokenizer=qwen.data.tokenizer), mistral.optim,
                                                   mistral.train)


@pytest.mark.parametrize("override, msg", [
    ("data.task=chat", "data.task must be one of lm, sft"),
    ("train.epochs=0", "train.epochs must be positive"),
    ("optim.warmup_fraction=1.5", r"optim.warmup_fraction must be in \[0, 1\)"),
])
def test_sft_options_are_validated(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_resume_accepts_checkpoints_saved_before_new_model_keys_and_rejects_other_models():
    import dataclasses

    from qsparse_jax.config import ModelConfig
    from qsparse_jax.train.loop import _same_model

    m = ModelConfig(act_bits=8, weight_bits="1.58")
    old = dataclasses.asdict(m)
    del old["rope_scaling"], old["kernels"]  # written by an earlier version
    assert _same_model(old, m)
    assert _same_model(old, m.replace(kernels="on", remat="full"))  # same parameters and gradients
    assert not _same_model({**old, "dim": 128}, m)
    assert not _same_model({**old, "unknown_key": 1}, m)
