"""``qsparse prepare``: tokenize a corpus once into memory-mapped token shards for training.

``qsparse prepare --source SRC [SRC ...] --tokenizer byte|PATH/tokenizer.json --out DIR [--workers N]
[--shard_index I --num_shards N] [--val_fraction F] [--text_field F] [--split_docs line|paragraph|file]
[--strict_utf8]``

Training then reads ``data.source=DIR`` without tokenizing anything. An interrupted run continues
where it stopped when started again with the same arguments (finished chunks are kept), and the
output is byte-identical however often it was interrupted. ``--num_shards N`` splits the work into
N parts for N machines or processes; the last part to finish (or ``--merge``) writes the manifest.
Plain text files are split into one document per line by default (``--split_docs``), as HF
``datasets``' ``text`` loader does; JSONL / Parquet / ArrayRecord records are documents as they are.
A prepare that fails (bad input, an empty validation split) leaves nothing in the way of the
corrected command. This command does not import JAX.
"""

from __future__ import annotations

import os

from ..data.corpus import SPLIT_MODES
from ..data.prepare import PrepareArgs, merge_parts, prepare
from .common import Parser, command, summary


@command(interrupted="prepare: interrupted; re-run the same command to continue (finished chunks are kept)")
def main(argv=None) -> int:
    p = Parser(prog="qsparse prepare", description=summary(__doc__))
    p.add_argument("--source", nargs="+", default=[], metavar="SRC",
                   help="stdlib, or files / directories of .txt .md .py .rst, .jsonl[.gz|.zst], .parquet, .arrayrecord")
    p.add_argument("--tokenizer", default="byte", help="byte (default) or a path to a HF tokenizer.json")
    p.add_argument("--out", required=True, help="output directory (data.source=OUT for training)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: 1 for bytes, where encoding is a copy; else one per core)")
    p.add_argument("--shard_index", type=int, default=0, help="this part's index, for --num_shards parallel parts")
    p.add_argument("--num_shards", type=int, default=1, help="number of parts the input is split into")
    p.add_argument("--val_fraction", type=float, default=0.02, help="fraction of documents held out (hash of name)")
    p.add_argument("--text_field", default="text", help="the text field of JSONL / Parquet / ArrayRecord records")
    p.add_argument("--shard_tokens", type=int, default=1 << 26, help="tokens per shard file (default 64 Mi)")
    p.add_argument("--chunk_mb", type=float, default=256.0, help="input MB per unit of work (and of --num_shards split)")
    p.add_argument("--split_docs", choices=SPLIT_MODES, default=None,
                   help="how plain text files become documents: line (default: each non-blank line, as HF datasets' "
                        "text loader yields them; a single big file then still gets a validation split), paragraph "
                        "(blocks between blank lines) or file (each file whole: code, Markdown); stdlib is one "
                        "document per module unless this is given")
    p.add_argument("--strict_utf8", action="store_true",
                   help="refuse invalid UTF-8 (one line naming the file and line) instead of reading it as U+FFFD "
                        "and reporting how much was replaced")
    p.add_argument("--merge", action="store_true", help="only write manifest.json from the finished parts in --out")
    args = p.parse_args(argv)
    if args.merge:
        print(f"prepare: wrote {merge_parts(args.out)}")
        return 0
    workers = args.workers if args.workers is not None else 1 if args.tokenizer == "byte" else os.cpu_count() or 1
    prepare(PrepareArgs(args.source, args.tokenizer, args.out, workers, args.shard_index, args.num_shards,
                        args.val_fraction, args.text_field, args.shard_tokens, args.chunk_mb,
                        split_docs=args.split_docs, strict_utf8=args.strict_utf8))
    return 0
