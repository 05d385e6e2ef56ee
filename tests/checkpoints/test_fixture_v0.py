"""A checkpoint written before the package was split into layers (``tests/fixtures/ckpt_v0/``, by main at 865ae06;
how: ``tests/fixtures/make_ckpt_v0.py``, its numbers: ``ckpt_v0.json``) restores unchanged with today's code, and
training resumed from it follows the curve of the run that was never interrupted."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.checkpoints.native import load_checkpoint_model
from qsparse_jax.config import load_config
from qsparse_jax.data import pipeline
from qsparse_jax.data.corpus import is_validation
from qsparse_jax.train.loop import train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
V0 = FIXTURES / "ckpt_v0"
RECORD = json.loads((FIXTURES / "ckpt_v0.json").read_text())


def corpus(d: Path) -> str:
    """Twelve documents of word salad, the same on every machine and Python version (make_ckpt_v0.py's own)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(12):
        (d / f"doc{i:02d}.py").write_text(" ".join(rng.choice(words, 200)) + "\n")
    return str(d)


@pytest.fixture(scope="module")
def restored():
    """(params, logits on the recorded tokens) of the checkpoint as today's code reads it."""
    _, params, graphdef = load_checkpoint_model(str(V0 / "checkpoints"))
    logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(RECORD["tokens"], jnp.int32)))
    return params, logits


def test_the_restored_model_gives_the_recorded_logits(restored):
    _, logits = restored
    np.testing.assert_allclose(logits[0, :4, :6], RECORD["logits_first"], rtol=1e-5, atol=1e-7)
    assert float(logits.sum()) == pytest.approx(RECORD["logits_sum"], rel=1e-5)
    assert float(np.abs(logits).sum()) == pytest.approx(RECORD["logits_abs_sum"], rel=1e-5)


def test_the_restored_parameters_are_the_saved_ones(restored):
    params, _ = restored
    assert float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(params))) == pytest.approx(
        RECORD["param_sum"], rel=1e-6)


def test_training_resumed_from_it_gives_the_uninterrupted_runs_losses(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(V0 / "checkpoints", workdir / "checkpoints")
    shutil.copy(V0 / "config.yaml", workdir / "config.yaml")
    source = corpus(tmp_path / "corpus")
    # The fixture was made when in-memory corpora split train / validation by a hash of each file's absolute path
    # (today: of its path relative to the corpus, "corpus/doc00.py", the same wherever the corpus lives). Split the
    # documents as they were split then, where the fixture was made (its data.source), so both runs see the same tokens.
    recorded = Path(load_config(str(V0 / "config.yaml")).data.source)
    assert Path(source).name == recorded.name
    monkeypatch.setattr(pipeline, "is_validation",
                        lambda name, fraction: is_validation(str(recorded.parent / name), fraction))
    train(load_config(str(workdir / "config.yaml"), RECORD["overrides"] + [f"data.source={source}"]), workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [3, 4]  # resumed after step 2: only the last two steps ran
    want = RECORD["losses_straight"]
    np.testing.assert_allclose([losses[3], losses[4]], [want["3"], want["4"]], atol=1e-5, rtol=0)
