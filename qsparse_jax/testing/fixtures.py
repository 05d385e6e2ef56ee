"""Tiny local models and data that the tests and the benchmarks share, made here (nothing is downloaded).

A random HF Llama directory (:func:`make_llama`), a byte-level BPE ``tokenizer.json`` trained here with
``tokenizers`` (:func:`make_tokenizer`), multiple-choice items and lm-eval task files over them
(:func:`make_mc_items`, :func:`write_mc_task`, :func:`write_gen_task`), and the environment that keeps HF
libraries offline (``OFFLINE_ENV``); the environment of a CPU subprocess with N simulated devices (:func:`cpu_env`).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import jax

WORDS = ("the a one red blue green small large old new cat dog bird fish tree house river stone light dark "
         "runs jumps sees finds makes takes walks sleeps sings reads over under near into from with "
         "quickly slowly always never today morning evening water fire earth wind king queen city road "
         "garden window door table chair book letter song story paper music").split()


OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def cpu_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """``os.environ`` for a CPU subprocess (``JAX_PLATFORMS=cpu``): ``XLA_FLAGS`` as this process has them (a
    test session's compile flags), less any simulated device count, plus ``devices`` simulated devices when
    given; ``extra`` variables on top."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")).split()
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), **extra)


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_tokenizer(path: Path, vocab_size: int = 512, seed: int = 0) -> None:
    """A byte-level BPE ``tokenizer.json`` (``<s>``, ``</s>`` specials) plus the ``tokenizer_config.json``
    transformers' AutoTokenizer reads next to it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    corpus = [_sentence(rng, 3, 12) + rng.choice([".", "!", "?", ","]) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": 256, "clean_up_tokenization_spaces": False}))


def make_llama(path: Path, vocab_size: int = 512, dim: int = 64, layers: int = 2, seed: int = 0) -> None:
    """A random HF Llama saved as safetensors, with the tokenizer in the same directory. Weights are drawn
    wider than the default init (std 0.2) so choices differ clearly in log-likelihood."""
    import torch
    import transformers

    make_tokenizer(path, vocab_size, seed)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False,
                                   attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(path, safe_serialization=True)


def make_mc_items(n: int, seed: int = 0, empty_every: int = 0) -> list[dict]:
    """``n`` four-choice items ``{context, choices, label}``; with ``empty_every`` every so many items
    has an empty context (lm-eval prefixes the end-of-text / BOS token then)."""
    rng = random.Random(seed + 1)
    items = []
    for i in range(n):
        ctx = "" if empty_every and i % empty_every == 0 else _sentence(rng, 4, 20) + ":"
        items.append({"context": ctx, "choices": [_sentence(rng, 1, 4) for _ in range(4)], "label": rng.randrange(4)})
    return items


def write_mc_task(dir: Path, items: list[dict], name: str = "tiny_mc") -> Path:
    """Our ``--mc`` JSONL and an lm-eval task YAML over the same file (``dataset_path: json``, local
    ``data_files``: read offline). Returns the JSONL path."""
    dir.mkdir(parents=True, exist_ok=True)
    data = dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (dir / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.absolute()}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        'doc_to_target: label\ntarget_delimiter: " "\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    return data


def write_gen_task(dir: Path, prompts: list[str], name: str = "tiny_gen", max_gen_toks: int = 12,
                   until: tuple[str, ...] = (".",)) -> Path:
    """A ``generate_until`` task over ``prompts`` (greedy, stop sequences ``until``, ``max_gen_toks``)."""
    dir.mkdir(parents=True, exist_ok=True)
    data = dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in prompts))
    stops = ", ".join(json.dumps(u) for u in until)
    (dir / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.absolute()}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: target\n"
        f"generation_kwargs:\n  until: [{stops}]\n  max_gen_toks: {max_gen_toks}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return data



def on_device(device, shape, dtype):
    """An abstract array placed on one device (a ``ShapeDtypeStruct`` to lower and compile for it)."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))
