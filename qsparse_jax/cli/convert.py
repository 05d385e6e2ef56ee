"""``qsparse import-hf`` / ``qsparse export-hf``: convert between Hugging Face model directories and checkpoints.

``qsparse import-hf SRC WORKDIR [--scan_layers]``: an HF Llama / Mistral / Qwen2 / BitNet directory ->
``WORKDIR/checkpoints/0`` (parameters) and ``WORKDIR/config.yaml`` (the model's config, its top-K
sparsity when config.json holds one, and its ``tokenizer.json``, copied with its tokenizer_config.json,
as data.tokenizer; a model that needs a tokenizer SRC lacks is an error). Continue training it with
``qsparse train --config WORKDIR/config.yaml --init_from WORKDIR/checkpoints --workdir RUN
model.sparsity.qkv=0.4 ...``.

``qsparse export-hf CKPT DST [--model_type T] [--ternary] [--overwrite]``: a training run's checkpoint
directory (or one step of it) -> an HF directory that ``transformers`` loads, with the tokenizer
(tokenizer.json, tokenizer_config.json, special_tokens_map.json) and the top-K sparsity (config.json key
``qsparse``). Written beside DST and renamed into place; a non-empty DST is refused unless --overwrite.
"""

from __future__ import annotations

from ..checkpoints.hf import export_hf, import_hf
from .common import Parser, command

IMPORT = ("Convert an HF Llama / Mistral / Qwen2 / BitNet directory into WORKDIR/checkpoints/0 (parameters) and "
          "WORKDIR/config.yaml (the model's config with the top-K sparsity its config.json holds; its tokenizer.json "
          "as data.tokenizer, tokenizer_config.json beside it; a model whose vocabulary is not the 256 bytes needs "
          "a tokenizer.json in SRC). Continue training it with: qsparse train --config WORKDIR/config.yaml "
          "--init_from WORKDIR/checkpoints --workdir RUN [key=value ...]")
EXPORT = ("Convert a run's checkpoint directory (its latest step) or one step of it into an HF directory that "
          "transformers loads: weights, the tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json) "
          "and the top-K sparsity (config.json key 'qsparse', restored by import-hf and eval / generate --hf; in "
          "transformers, qsparse_jax.checkpoints.hf_topk.apply_topk(model) applies it). DST is written beside "
          "itself and renamed into place.")


@command()
def import_main(argv=None) -> int:
    """``qsparse import-hf``."""
    p = Parser(prog="qsparse import-hf", description=IMPORT)
    p.add_argument("src", help="HF model directory (config.json + safetensors)")
    p.add_argument("workdir", help="output: WORKDIR/checkpoints/0 and WORKDIR/config.yaml")
    p.add_argument("--scan_layers", action="store_true",
                   help="stack the layers for model.scan_layers (compile time independent of depth)")
    args = p.parse_args(argv)
    print(f"wrote {import_hf(args.src, args.workdir, args.scan_layers)}")
    return 0


@command()
def export_main(argv=None) -> int:
    """``qsparse export-hf``."""
    p = Parser(prog="qsparse export-hf", description=EXPORT)
    p.add_argument("ckpt", help="checkpoint directory of a run (its latest step) or one step of it")
    p.add_argument("dst", help="output HF directory")
    p.add_argument("--model_type", choices=["llama", "mistral", "qwen2", "bitnet"], default=None,
                   help="HF architecture to write (default: from the model's config)")
    p.add_argument("--ternary", action="store_true",
                   help="1.58-bit models: write 2-bit packed ternary weights + scales (transformers' bitnet)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty DST whole (default: refuse it)")
    args = p.parse_args(argv)
    print(f"wrote {export_hf(args.ckpt, args.dst, args.model_type, args.ternary, overwrite=args.overwrite)}")
    return 0
