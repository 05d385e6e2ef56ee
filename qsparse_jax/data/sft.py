"""Supervised fine-tuning data: JSONL conversations → packed rows with loss only on responses.

A record is ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role": ..., "content": ...}]}``
(roles ``system`` / ``user`` / ``assistant``). Text is laid out by the tokenizer's chat template (the
Jinja ``chat_template`` of the ``tokenizer_config.json`` next to ``tokenizer.json``, rendered as
transformers renders it) or, without one, by :data:`PLAIN_TEMPLATE`. Each assistant turn, and the
end-of-example token after the last, is a *response* segment: the loss is taken on those tokens only.

Examples are packed greedily, in a seeded order, into rows of ``seq_len + 1`` tokens. Each row carries
``segment_ids`` (1, 2, … per example, 0 for padding) so attention never crosses examples,
``positions`` restarting at 0 per example (RoPE), and ``weights`` on the *targets*: predicting token
``j`` counts iff it is a response token of the same example as token ``j − 1``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from .corpus import VAL_FRACTION, decode_utf8, document_name, is_validation
from .tokenizer import DataError, make_tokenizer

# Used when the tokenizer has no chat template (e.g. the byte tokenizer).
PLAIN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


ROLES = ("system", "user", "assistant")


def load_chat_template(tokenizer_spec: str) -> tuple[str | None, dict]:
    """(Jinja template or None, special-token strings) from ``tokenizer_config.json`` beside the tokenizer."""
    if tokenizer_spec == "byte":
        return None, {}
    cfg_path = Path(tokenizer_spec).with_name("tokenizer_config.json")
    if not cfg_path.is_file():
        return None, {}
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{cfg_path}: not valid JSON ({e.msg})") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    specials = {}
    for key in ("bos_token", "eos_token"):
        tok = cfg.get(key)
        specials[key] = tok.get("content", "") if isinstance(tok, dict) else (tok or "")
    return template, specials


def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise DataError(f"the tokenizer's chat template does not compile: {e}") from None


class ChatFormat:
    """Renders conversations into (text, is_response) segments with one chat template."""

    def __init__(self, template: str | None, specials: dict | None = None):
        self.plain = template is None
        self._template = _compile(template or PLAIN_TEMPLATE)
        self._specials = specials or {}

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._specials)
        except TemplateError as e:
            raise DataError(f"chat template: {e}") from None

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """Each assistant turn is the text its rendering adds after the generation prompt before it."""
        out, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[:i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError("the chat template does not render conversations prefix by prefix; "
                                "cannot locate assistant turns")
            out += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        tail = self.render(messages, add_generation_prompt=False)[len(done):]
        return out + ([(tail, False)] if tail else [])


def _messages(rec, where: str) -> list[dict]:
    if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
        return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: expected {{'prompt', 'response'}} strings or a non-empty 'messages' list")
    for m in msgs:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: each message needs a role in {ROLES} and a string content, got {m!r}"[:300])
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return msgs


@dataclass
class Example:
    tokens: np.ndarray  # int32 [n]
    response: np.ndarray  # bool [n]: token is part of a response


def encode_example(messages: list[dict], tok, fmt: ChatFormat) -> Example:
    """Tokens of every segment, then the end-of-example token (a response token: the model learns to stop)."""
    ids, resp = [], []
    for text, is_response in fmt.segments(messages):
        t = np.asarray(tok.encode(text), np.int32)
        ids.append(t)
        resp.append(np.full(len(t), is_response))
    ids.append(np.asarray([tok.separator], np.int32))
    resp.append(np.asarray([True]))
    return Example(np.concatenate(ids), np.concatenate(resp))


def read_examples(cfg: DataConfig, tok, fmt: ChatFormat) -> dict[bool, list[Example]]:
    """Examples of every ``.jsonl`` under ``data.source``, split train/validation by a hash of their place
    inside the source (``DIRNAME/relative/file.jsonl:LINE``: the same wherever the source lives)."""

    src = Path(cfg.source)
    if cfg.source == "stdlib" or not src.exists():
        raise DataError(f"data.task=sft needs data.source to be a .jsonl file or a directory of them, got {cfg.source!r}")
    files = sorted(src.rglob("*.jsonl")) if src.is_dir() else [src]
    split: dict[bool, list[Example]] = {False: [], True: []}
    replaced, bad_files = 0, []
    for f in files:
        try:
            text, bad = decode_utf8(f.read_bytes(), str(f), whole_file=True)
        except OSError as e:
            raise DataError(f"cannot read {f}: {e.strerror}") from None
        if bad:
            replaced, bad_files = replaced + bad, [*bad_files, f]
        name = document_name(src, f)  # the split hashes names inside the source, never where it lives
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            where = f"{f}:{i + 1}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            fraction = VAL_FRACTION if cfg.val_fraction is None else cfg.val_fraction
            split[is_validation(f"{name}:{i + 1}", fraction)].append(
                encode_example(_messages(rec, where), tok, fmt))
    if replaced:
        print(f"note: invalid UTF-8 in {len(bad_files)} SFT file(s) ({replaced} bytes; first: {bad_files[0]}) "
              "was read as U+FFFD", file=sys.stderr)
    n = len(split[False]) + len(split[True])
    if n < 2:
        raise DataError(f"data.source {cfg.source!r} holds {n} SFT examples; need at least 2")
    if not split[True] or not split[False]:  # tiny sets: hold out the last example
        every = split[False] + split[True]
        split = {False: every[:-1], True: every[-1:]}
    return split


def pack(examples: list[Example], seq_len: int, seed: int) -> tuple[dict[str, np.ndarray], int]:
    """Rows of ``seq_len + 1`` tokens (see module docstring) and the number of truncated examples."""
    width = seq_len + 1
    order = np.random.default_rng(seed).permutation(len(examples))
    rows: list[list[Example]] = []
    room: list[int] = []
    truncated = 0
    for i in order:  # first fit among the last 64 rows (linear time), else a new row
        ex = examples[i]
        if len(ex.tokens) > width:
            ex, truncated = Example(ex.tokens[:width], ex.response[:width]), truncated + 1
        r = next((j for j, free in enumerate(room[-64:], start=max(len(room) - 64, 0)) if free >= len(ex.tokens)), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(ex)
        room[r] -= len(ex.tokens)
    n = len(rows)
    tokens = np.zeros((n, width), np.int32)
    seg = np.zeros((n, width), np.int32)
    pos = np.zeros((n, width), np.int32)
    resp = np.zeros((n, width), bool)
    for r, exs in enumerate(rows):
        at = 0
        for s, ex in enumerate(exs, start=1):
            m = len(ex.tokens)
            tokens[r, at:at + m], seg[r, at:at + m], resp[r, at:at + m] = ex.tokens, s, ex.response
            pos[r, at:at + m] = np.arange(m)
            at += m
    weights = (resp[:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(np.float32)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "weights": weights}, truncated


@dataclass
class SFTSplits:
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    vocab_size: int
    n_docs: tuple[int, int]


def load_sft(cfg: DataConfig) -> SFTSplits:
    """Packed train / validation rows of the SFT corpus named by ``cfg``."""
    tok = make_tokenizer(cfg.tokenizer)
    fmt = ChatFormat(*load_chat_template(cfg.tokenizer))
    split = read_examples(cfg, tok, fmt)
    train, cut = pack(split[False], cfg.seq_len, cfg.seed)
    val, cut_val = pack(split[True], cfg.seq_len, cfg.seed)
    if cut + cut_val:
        print(f"note: {cut + cut_val} SFT examples are longer than data.seq_len + 1 = {cfg.seq_len + 1} tokens "
              "and were truncated", file=sys.stderr, flush=True)
    short = cfg.batch_size - len(val["tokens"])
    if short > 0:  # a small validation split fills its one batch with empty rows (weight 0)
        val = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in val.items()}
    if not train["weights"].any():
        raise DataError("no response tokens in the training split (every response truncated away?)")
    return SFTSplits(train, val, tok.vocab_size, (len(split[False]), len(split[True])))

