"""``qsparse lm-eval``: lm-evaluation-harness's own command line, with this library's models as ``--model qsparse_jax``.

``qsparse lm-eval --model qsparse_jax --model_args hf=DIR,sparsity=0.4 --tasks T [--include_path P]
[--batch_size 32] [--log_samples --output_path OUT]``

Every lm-eval flag works (``--model hf`` too). ``--model_args`` keys: ``hf=DIR`` or ``ckpt=DIR``;
``sparsity=S`` and / or per group ``qkv=``, ``out=``, ``gate_up=``, ``down=`` (default: the model's own);
``block_size=M``; ``kernels=on`` and ``bits=2|1.6`` (1.58-bit models); ``tokenizer=PATH``;
``max_length``; ``max_gen_toks``. Needs lm-evaluation-harness: ``pip install -e ".[eval]"``.
"""

from __future__ import annotations

import sys

from ..errors import ConfigError
from ..infer import lm_eval_backend  # registers --model qsparse_jax
from .common import command, snake_flags, summary


@command()
def main(argv=None) -> int:
    argv = snake_flags(sys.argv[1:] if argv is None else list(argv))
    if lm_eval_backend._MISSING:
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: qsparse lm-eval [lm-eval options]\n\n{summary(__doc__)}")
            return 0
        raise ConfigError(lm_eval_backend._MISSING)
    # an optional dependency: imported once known to be installed
    from lm_eval.__main__ import cli_evaluate

    if argv and argv[0] in ("-h", "--help"):
        print(f"qsparse lm-eval: {summary(__doc__).splitlines()[0]}\n")
    sys.argv = ["qsparse lm-eval", *argv]  # lm-eval's parser reads sys.argv
    cli_evaluate()
    return 0
