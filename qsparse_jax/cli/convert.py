"""``qsparse import-hf`` / ``qsparse export-hf``: convert between Hugging Face model directories and checkpoints.

``qsparse import-hf SRC WORKDIR [--scan_layers]``: an HF Llama / Mistral / Qwen2 / BitNet directory ->
``WORKDIR/checkpoints/0`` (parameters) and ``WORKDIR/config.yaml`` (the model's config, and its
``tokenizer.json`` as data.tokenizer when it has one). Continue training it with ``qsparse train
--config WORKDIR/config.yaml --init_from WORKDIR/checkpoints --workdir RUN model.sparsity.qkv=0.4 ...``.

``qsparse export-hf CKPT DST [--model_type T] [--ternary]``: a training run's checkpoint directory (or
one step of it) -> an HF directory that ``transformers`` loads.
"""

from __future__ import annotations

from ..checkpoints.hf import export_hf, import_hf
from .common import Parser, command

IMPORT = ("Convert an HF Llama / Mistral / Qwen2 / BitNet directory into WORKDIR/checkpoints/0 (parameters) and "
          "WORKDIR/config.yaml (the model's config; its tokenizer.json as data.tokenizer when it has one). Continue "
          "training it with: qsparse train --config WORKDIR/config.yaml --init_from WORKDIR/checkpoints --workdir RUN "
          "[key=value ...]")
EXPORT = ("Convert a run's checkpoint directory (its latest step) or one step of it into an HF directory that "
          "transformers loads. transformers runs the weights with dense activations (top-K is not part of its models).")


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
    args = p.parse_args(argv)
    print(f"wrote {export_hf(args.ckpt, args.dst, args.model_type, args.ternary)}")
    return 0
