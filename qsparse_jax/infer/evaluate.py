"""Evaluation: perplexity and multiple-choice log-likelihood accuracy, dense vs sparse side by side,
scored in bucketed batches with lm-evaluation-harness's conventions.

``qsparse eval (--hf DIR | --ckpt DIR) [--ppl FILE] [--mc FILE.jsonl] [--sparsity S]``

The same weights are evaluated dense and, when a sparsity is set (``--sparsity`` or the checkpoint's
own), with top-K keeping ``1 − S`` of every projection input. ``--mc`` takes JSONL lines
``{"context": str, "choices": [str, ...], "label": int, "target_delimiter": str (default " ")}``: each
choice is scored as lm-eval scores a ``multiple_choice`` task's request ``(context, delimiter + choice)``.
``--ppl`` takes text or JSONL (``text`` field); each document is scored in lm-eval's rolling windows.

Conventions, as lm-eval 0.4 (``lm_eval/api/model.py`` ``TemplateLM``, ``lm_eval/utils.py``,
``lm_eval/api/task.py`` ``process_results``, ``lm_eval/models/huggingface.py``):

- context / continuation split: trailing whitespace of the context moves to the continuation; the
  continuation's tokens are those of ``encode(context + continuation)`` after ``len(encode(context))``;
  an empty context becomes the prefix token (BOS, else end-of-text);
- a pair longer than ``max_length + 1`` tokens is truncated from the left;
- ``acc``: argmax of summed log-likelihood; ``acc_norm``: of log-likelihood / the choice's length in
  characters (``len(choice)``, delimiter excluded: lm-eval's ``completion_len``); ``acc_bytes``: / its
  UTF-8 length in bytes; ``acc_per_token``: / its number of tokens (our former ``acc_norm``);
- rolling windows for perplexity: ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``.

Speed: requests are sorted by length and right-padded into a few bucket widths; one program is compiled
per (bucket width, batch size), batches are split over the local devices (data-parallel), and the dense
and sparse columns reuse the same tokenized, bucketed, device-resident batches.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..config import DataConfig, SparsityConfig
from ..data.pipeline import iter_documents
from ..errors import ConfigError, DataError
from ..nn.sharding import batch_sharding
from ..progress import Progress
from .variants import sparsity_config, variant

GROUPS = ("qkv", "out", "gate_up", "down")


def encode_pair(encode, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """Token ids ``(context, continuation)`` of a log-likelihood request, as lm-eval's
    ``TemplateLM.loglikelihood`` / ``_encode_pair`` (lm_eval/api/model.py) make them."""
    if context == "":
        cont = [int(t) for t in encode(continuation)]
        pair = ([prefix_id], cont) if not cont or cont[0] != prefix_id else (cont[:1], cont[1:])
    else:
        n = len(context) - len(context.rstrip())  # trailing whitespace belongs to the continuation
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = [int(t) for t in encode(context + continuation)]
        ctx = [int(t) for t in encode(context)]
        pair = (ctx, whole[len(ctx):])
    if not pair[1]:
        raise DataError(f"continuation {continuation!r} of context {context[-40:]!r} encodes to no tokens")
    return pair


def rolling_windows(tokens: list[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, continuation)`` windows predicting every token of a document once, each with
    as much context as fits in ``max_length`` (lm_eval/utils.py ``get_rolling_token_windows`` with
    ``context_len=1``, then ``make_disjoint_window``); the first is conditioned on ``prefix_id``."""
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    first = min(max_length, len(tokens))
    windows = [([prefix_id] + tokens[:first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        windows.append((tokens[max(end - max_length - 1, 0):end - 1], tokens[end - n:end]))
        done = end
    for ctx, cont in windows:  # make_disjoint_window
        out.append((ctx[:len(ctx) - (len(cont) - 1)], cont))
    return out


def bucket_widths(max_length: int, smallest: int = 16) -> list[int]:
    """Padded widths 16, 24, 32, 48, 64, ... (steps of at most 1.5x) up to ``max_length``: at most
    ~2·log2(max_length / 16) + 1 compiled programs, at most 50 % padding."""
    widths, w = {max_length}, smallest
    while w < max_length:
        widths.update(x for x in (w, w * 3 // 2) if x < max_length)
        w *= 2
    return sorted(widths)


@dataclass
class Batches:
    """Requests laid out once into right-padded batches per bucket width, on the devices: scored by any
    number of variants of the same model (dense, sparse) without re-tokenizing or re-transferring."""

    n: int  # requests
    widths: list[int] = field(default_factory=list)
    arrays: list[tuple] = field(default_factory=list)  # (tokens, targets, mask) per batch, device arrays
    index: list[np.ndarray] = field(default_factory=list)  # request index of each row, -1 for padding
    tokens: int = 0  # real (unpadded) input tokens

    @property
    def buckets(self) -> int:
        return len(set(self.widths))


def make_batches(pairs: list[tuple[list[int], list[int]]], max_length: int, batch_size: int, mesh=None) -> Batches:
    """Bucket ``(context, continuation)`` token pairs: the model reads ``(ctx + cont)[-(max_length+1):][:-1]``
    (left truncation, as lm-eval's HF backend) and scores the continuation's positions. Rows are sorted by
    length, so each batch pads little; the batch size is rounded up to a multiple of the data-parallel
    devices and the batch axis is split over them."""

    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    shard = batch_sharding(mesh) if mesh is not None else None
    ndev = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
    rows = -(-batch_size // ndev) * ndev
    widths = bucket_widths(max_length)
    seqs = []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise DataError(f"request {i}: empty context or continuation")
        if len(cont) > max_length:
            raise DataError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length {max_length}")
        seq = (list(ctx) + list(cont))[-(max_length + 1):]
        seqs.append((seq, len(cont)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # longest first, as lm-eval
    out = Batches(n=len(pairs))
    by_width: dict[int, list[int]] = {}
    for i in order:
        n = len(seqs[i][0]) - 1
        by_width.setdefault(next(w for w in widths if w >= n), []).append(i)
    for w, idx in by_width.items():
        for s in range(0, len(idx), rows):
            chunk = idx[s:s + rows]
            tok = np.zeros((rows, w), np.int32)
            tgt = np.zeros((rows, w), np.int32)
            mask = np.zeros((rows, w), np.float32)
            for r, i in enumerate(chunk):
                seq, nc = seqs[i]
                n = len(seq) - 1
                tok[r, :n], tgt[r, :n] = seq[:-1], seq[1:]
                mask[r, n - nc:n] = 1.0  # position t predicts token t + 1: the continuation's tokens
                out.tokens += n
            arrays = (tok, tgt, mask)
            out.arrays.append(tuple(jax.device_put(a, shard) for a in arrays) if shard is not None else
                              tuple(jnp.asarray(a) for a in arrays))
            out.widths.append(w)
            out.index.append(np.asarray(chunk + [-1] * (rows - len(chunk))))
    return out


class Scorer:
    """Summed log-likelihood and greedy-ness of each request's continuation under one ``(apply, params)``.

    One program is compiled (ahead of time) per batch shape, i.e. per bucket width for a fixed batch
    size; ``compiles`` counts them and ``compile_s`` their time. Only ``[batch]`` results leave the device."""

    def __init__(self, apply, params):
        self.params = params
        self.compiles = 0
        self.compile_s = 0.0
        self._compiled: dict = {}

        def score(params, tokens, targets, mask):
            logits = apply(params, tokens).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            tl = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | (mask == 0), axis=-1)
            return jnp.sum(tl * mask, axis=-1), greedy

        self._jit = jax.jit(score)

    def _program(self, arrays):
        key = tuple((a.shape, str(a.sharding)) for a in arrays)
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = self._jit.lower(self.params, *arrays).compile()
            self.compile_s += time.perf_counter() - t0
            self.compiles += 1
        return self._compiled[key]

    def __call__(self, batches: Batches, desc: str | None = None, progress: bool | None = None):
        """``(loglikelihood [n] float64, is_greedy [n] bool)`` in request order. All batches are dispatched
        before any result is read, so the host never waits between them. ``progress`` (default on; False:
        off): requests scored, as ``qsparse_jax/progress.py`` shows it (a bar on a terminal, lines in a log),
        on the first host only; it starts before compilation and dispatch, which it counts."""
        bar = Progress(batches.n, desc or "scoring", "requests", leave=False,
                       enabled=progress is not False and jax.process_index() == 0)
        pending = [(self._program(a)(self.params, *a), idx) for a, idx in zip(batches.arrays, batches.index)]
        ll = np.zeros(batches.n, np.float64)
        greedy = np.zeros(batches.n, bool)
        for (l, g), idx in pending:
            l, g = np.asarray(l), np.asarray(g)
            keep = idx >= 0
            ll[idx[keep]], greedy[idx[keep]] = l[keep], g[keep]
            bar.update(int(keep.sum()))
        bar.close()
        return ll, greedy


def mc_requests(encode, items: list[dict], prefix_id: int) -> list[tuple[list[int], list[int]]]:
    """One request ``(context, target_delimiter + choice)`` per choice, items in order (lm-eval's
    ``multiple_choice`` ``construct_requests``)."""
    return [encode_pair(encode, it["context"], it.get("target_delimiter", " ") + c, prefix_id)
            for it in items for c in it["choices"]]


def mc_metrics(items: list[dict], ll: np.ndarray, n_tokens: list[int]) -> dict[str, float]:
    """Accuracies from each choice's log-likelihood (lm_eval/api/task.py ``process_results``)."""
    acc = {"acc": 0, "acc_norm": 0, "acc_bytes": 0, "acc_per_token": 0}
    k = 0
    for it in items:
        m = len(it["choices"])
        s, toks = ll[k:k + m], np.asarray(n_tokens[k:k + m], np.float64)
        chars = np.asarray([len(c) for c in it["choices"]], np.float64)
        nbytes = np.asarray([len(c.encode("utf-8")) for c in it["choices"]], np.float64)
        for name, v in (("acc", s), ("acc_norm", s / chars), ("acc_bytes", s / nbytes), ("acc_per_token", s / toks)):
            acc[name] += int(np.argmax(v) == it["label"])
        k += m
    return {name: v / len(items) for name, v in acc.items()}


def read_mc(path: str) -> list[dict]:
    items = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DataError(f"cannot read --mc file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"--mc file {path} is not UTF-8 text") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            it = json.loads(line)
            ok = (isinstance(it["context"], str) and isinstance(it["choices"], list) and len(it["choices"]) >= 2
                  and all(isinstance(c, str) and c for c in it["choices"]) and isinstance(it["label"], int)
                  and 0 <= it["label"] < len(it["choices"]) and isinstance(it.get("target_delimiter", " "), str))
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise DataError(f"{path}:{i + 1}: expected {{\"context\": str, \"choices\": [str, str, ...], \"label\": int"
                            f"[, \"target_delimiter\": str]}} with non-empty choices")
        items.append(it)
    if not items:
        raise DataError(f"--mc file {path} holds no items")
    return items


def read_documents(path: str) -> list[str]:
    docs = [text for _, text in iter_documents(DataConfig(source=path)) if text]
    if not docs:
        raise DataError(f"--ppl {path} holds no text")
    return docs


def ppl_requests(tok, docs: list[str], prefix_id: int, max_length: int) -> tuple[list, int, int]:
    """Rolling-window requests of every document (lm-eval ``loglikelihood_rolling``), the number of
    tokens they predict and of UTF-8 bytes in the documents."""
    pairs, n_tok, n_bytes = [], 0, 0
    for d in docs:
        ids = [int(t) for t in tok.encode(d)]
        pairs += rolling_windows(ids, prefix_id, max_length)
        n_tok += len(ids)
        n_bytes += len(d.encode("utf-8"))
    return pairs, n_tok, n_bytes



def evaluate(ld, *, docs: list[str] | None = None, mc_items: list[dict] | None = None, seq_len: int | None = None,
             batch_size: int = 32, kernels: str = "off", sparsity: float | None = None, block_size: int | None = None,
             **groups: float | None) -> tuple[dict[str, dict], list[dict]]:
    """``qsparse eval`` on a loaded model (``checkpoints.source.load``'s result): perplexity of ``docs``
    and / or multiple-choice metrics of ``mc_items``, in a dense column and, when the model or the options
    are sparse (``variants.sparsity_config``: unset options keep the model's own), a sparse one. Every
    column scores the same tokenized, bucketed, device-resident batches. Returns ``({column: metrics},
    [stats per column: compiles, compile_s, score_s, buckets]``)."""
    if docs is None and mc_items is None:
        raise ConfigError("give --ppl FILE and/or --mc FILE")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be positive, got {batch_size}")
    model, tok = ld.model, ld.tokenizer
    max_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    sparse = sparsity_config(sparsity, default=model.config.sparsity, block_size=block_size, **groups)
    model.config.replace(sparsity=sparse)  # validates S and the block size against this model
    columns = {"dense": SparsityConfig()}
    if sparse.enabled:
        columns[f"sparse (S={max(getattr(sparse, g) for g in GROUPS):g}"
                f"{f', {sparse.block_size}-blocks' if sparse.block_size else ''})"] = sparse
    # tokenize and lay out once; every column scores the same device-resident batches
    widths = []
    if mc_items is not None:
        mc_pairs = mc_requests(tok.encode, mc_items, ld.prefix_id)
        mc_batches = make_batches(mc_pairs, max_len, batch_size, ld.mesh)
        widths += mc_batches.widths
    if docs is not None:
        ppl_pairs, n_tok, n_bytes = ppl_requests(tok, docs, ld.prefix_id, max_len)
        ppl_batches = make_batches(ppl_pairs, max_len, batch_size, ld.mesh)
        widths += ppl_batches.widths
    rows, stats = {}, []
    for name, sp in columns.items():
        t0 = time.perf_counter()
        scorer = Scorer(*variant(model, sp, kernels))
        r = {}
        if docs is not None:
            ll, _ = scorer(ppl_batches, desc=f"{name}: perplexity")
            r["perplexity"] = math.exp(-ll.sum() / n_tok)
            r["bits_per_byte"] = -ll.sum() / (n_bytes * math.log(2))
        if mc_items is not None:
            ll, _ = scorer(mc_batches, desc=f"{name}: multiple choice")
            r.update(mc_metrics(mc_items, ll, [len(c) for _, c in mc_pairs]))
        rows[name] = r
        stats.append({"column": name, "compiles": scorer.compiles, "compile_s": scorer.compile_s,
                      "score_s": time.perf_counter() - t0, "buckets": len(set(widths))})
    return rows, stats
