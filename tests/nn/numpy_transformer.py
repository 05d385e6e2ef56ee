"""An independent float64 numpy forward pass of the Q-Sparse / BitNet Llama-style decoder, for tests.

Written from the papers' equations (SEEDS.md §1: Q-Sparse Eq. 1–11, BitNet b1.58's absmean ternary
and absmax int8 quantizers, BitNet's 1-bit ``sign(W − mean W)·mean|W|``) and the model's documented
behaviour (``ModelConfig`` field docs, docstrings), not from the package's code: nothing here imports
``qsparse_jax``. It reads the parameters as a plain nested dict of arrays (``nnx.to_pure_dict``) and
the configuration's plain fields.

The decoder (Llama): ``x = embed[tokens]``; per block
``x += attn(norm(x))``, ``x += ffn(norm(x))``; ``logits = norm(x) @ head`` with ``head = embedᵀ`` when
the embeddings are tied. RMSNorm ``x / sqrt(mean(x²) + eps) · w``. Every linear projection
``y = Q(Top_k(x)) Q_w(W)`` with the weight stored ``[in, out]``, where the input first passes a
parameter-free RMSNorm with ``input_norm`` (BitLinear), then top-K by magnitude per token (or per block
of ``block_size`` features: N:M), optionally rescaled to the input's L2 norm per token (``l2_preserve``),
then per-token absmax int8 fake quantization. q/k/v share one sparsified input, as do gate/up.
Attention: RoPE (half-split, ``θ^(−2i/d)``), grouped-query heads (query head ``h`` reads kv head
``h // (n_heads / n_kv_heads)``), causal softmax of ``q·k / √d``. SubLN (BitNet): an RMSNorm with its
own weight on the attention output before o_proj and on the GLU hidden before down_proj. GLU:
``down(up(x) ⊙ act(gate(x)))``, act = ReLU² (Eq. 11) or SiLU, top-K at the down input after the
activation. The LM head is dense, full precision, float32.

With ``bf16`` the activations are rounded to bfloat16 wherever a bfloat16 model holds them (after each
op in the compute dtype; norms, RoPE, the softmax and the quantizer scales in float32; matmuls
accumulate in float32 and round their outputs), the weights are rounded after quantization. The order
of rounding inside fused XLA ops is not knowable from here, so bfloat16 agreement is only approximate.

Every discrete decision (which entries top-K keeps, which int8 / ternary level a value rounds to, the
sign of a 1-bit weight) is recorded with its distance to the decision boundary in ``margins``, so a test
can pick inputs whose decisions a float32 model cannot take differently from this float64 reference.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

EPS_Q = 1e-5  # the quantizers' clamp of max|x| and mean|W| (BitNet reference code)


def _bf16(x):
    return np.asarray(x, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)


class Reference:
    """``Reference(config, params, bf16=False).logits(tokens)`` → float64 [batch, seq, vocab].

    ``margins`` afterwards holds the smallest distance to a decision boundary seen for each kind:
    ``topk`` (gap between the k-th and (k+1)-th largest magnitude of a row / block, over the row's
    largest magnitude; rows whose k-th magnitude is itself below ``topk_floor`` of it, e.g. ReLU² zeros,
    do not count: swapping such entries changes nothing measurable; nor do exact ties, which are
    structural and broken towards the lowest index alike), ``int8`` and ``ternary`` (distance of
    the scaled value to the nearest rounding midpoint, in quantization levels), ``binary`` (|w − mean w|
    over mean|w|).
    """

    def __init__(self, config, params, bf16: bool = False):
        self.c = config
        self.p = _as_float64(params)
        self.round = _bf16 if bf16 else (lambda x: x)
        self.margins = {}
        self.topk_floor = 1e-5  # rows with k-th magnitude below this (times the row max) are not decisions

    # ----- bookkeeping -----
    def _margin(self, kind, value):
        if np.size(value):
            self.margins[kind] = min(self.margins.get(kind, math.inf), float(np.min(value)))

    # ----- pieces -----
    def rms_norm(self, x, w=None):
        y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.c.norm_eps)
        return self.round(y if w is None else y * w)

    def top_k(self, x, sparsity):
        """X ⊙ Top_k(|X|) per token (Eq. 2–3), per block of ``block_size`` with Block Q-Sparse."""
        if sparsity == 0:
            return x
        sp = self.c.sparsity
        span = sp.block_size or x.shape[-1]
        k = int((1.0 - sparsity) * span)  # the authors' keep count
        blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // span, span))
        mag = np.abs(blocks)
        order = np.argsort(-mag, axis=-1, kind="stable")  # descending, ties to the lowest index
        keep = np.zeros(blocks.shape, bool)
        np.put_along_axis(keep, order[..., :k], True, axis=-1)
        if k < span:
            srt = np.take_along_axis(mag, order, axis=-1)
            top = np.maximum(srt[..., 0], 1e-300)
            gap = (srt[..., k - 1] - srt[..., k]) / top
            # an exact tie (gap 0) is structural, e.g. two query heads reading the same kv head see the
            # same values at position 0: equal in float32 too, so lowest-index-first decides it alike
            decides = (srt[..., k - 1] > self.topk_floor * top) & (gap > 0)
            self._margin("topk", gap[decides])
        y = np.where(keep, blocks, 0.0).reshape(x.shape)
        if sp.rescale == "l2_preserve":  # kept entries times ‖x‖ / ‖x ⊙ M‖, per token
            full = np.linalg.norm(x, axis=-1, keepdims=True)
            kept = np.linalg.norm(y, axis=-1, keepdims=True)
            y = self.round(y * np.where(kept > 0, full / np.where(kept > 0, kept, 1.0), 1.0))
        return y

    def act_quant(self, x):
        """Per-token absmax int8 (Eq. 5–7): RoundClip(127/γ · x, −128, 127) · γ/127, γ = max|x|."""
        if self.c.act_bits is None:
            return x
        gamma = np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), EPS_Q)
        scaled = x * (127.0 / gamma)
        self._margin("int8", np.abs(np.abs(scaled - np.floor(scaled)) - 0.5))
        return self.round(np.clip(np.rint(scaled), -128, 127) * (gamma / 127.0))

    def weight(self, w):
        bits = self.c.weight_bits
        if bits == "1.58":  # absmean ternary (Eq. 9–10): RoundClip(W/α, −1, 1) · α, α = mean|W|
            alpha = max(np.mean(np.abs(w)), EPS_Q)
            scaled = w / alpha
            self._margin("ternary", np.abs(np.abs(scaled) - 0.5))
            w = np.clip(np.rint(scaled), -1, 1) * alpha
        elif bits == "1":  # BitNet 1-bit: sign(W − mean W) · mean|W|
            centred = w - np.mean(w)
            self._margin("binary", np.abs(centred) / np.mean(np.abs(w)))
            w = np.sign(centred) * np.mean(np.abs(w))
        return self.round(w)

    def sparsify(self, x, sparsity):
        """The input path shared by the projections reading ``x``: input norm → top-K → int8."""
        if self.c.input_norm:
            x = self.rms_norm(x)
        return self.act_quant(self.top_k(x, sparsity))

    def project(self, xs, w):
        return self.round(xs @ self.weight(w))

    def rope(self, x):
        """Half-split rotary embedding at positions 0..s−1: x·cos + rotate_half(x)·sin."""
        s, d = x.shape[1], x.shape[-1]
        inv = self.c.rope_theta ** (-np.arange(0, d, 2) / d)
        ang = np.arange(s)[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return self.round(np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1))

    def attention(self, p, x):
        c = self.c
        b, s, _ = x.shape
        h, g = c.n_heads, (c.n_kv_heads or c.n_heads)
        d = c.head_dim or c.dim // c.n_heads
        xs = self.sparsify(x, c.sparsity.qkv)
        q = self.rope(self.project(xs, p["wq"]["weight"]).reshape(b, s, h, d))
        k = self.rope(self.project(xs, p["wk"]["weight"]).reshape(b, s, g, d))
        v = self.project(xs, p["wv"]["weight"]).reshape(b, s, g, d)
        kv = np.arange(h) // (h // g)  # the kv head each query head reads
        k, v = k[:, :, kv], v[:, :, kv]
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs = self.round(probs / probs.sum(-1, keepdims=True))
        out = self.round(np.einsum("bhqk,bkhd->bqhd", probs, v)).reshape(b, s, h * d)
        if c.subln:
            out = self.rms_norm(out, p["subln"]["weight"])
        return self.project(self.sparsify(out, c.sparsity.out), p["wo"]["weight"])

    def feed_forward(self, p, x):
        c = self.c
        xs = self.sparsify(x, c.sparsity.gate_up)
        gate = self.project(xs, p["w_gate"]["weight"])
        if c.activation == "relu2":
            act = self.round(np.maximum(gate, 0.0) ** 2)
        else:  # SiLU: g · sigmoid(g)
            act = self.round(gate * self.round(1.0 / (1.0 + np.exp(-gate))))
        hidden = self.round(self.project(xs, p["w_up"]["weight"]) * act)
        if c.subln:
            hidden = self.rms_norm(hidden, p["subln"]["weight"])
        return self.project(self.sparsify(hidden, c.sparsity.down), p["w_down"]["weight"])

    def logits(self, tokens):
        p = self.p
        x = self.round(p["embed"][np.asarray(tokens)])
        for i in range(self.c.n_layers):
            layer = p["layers"][i]
            x = self.round(x + self.attention(layer["attn"], self.rms_norm(x, layer["attn_norm"]["weight"])))
            x = self.round(x + self.feed_forward(layer["mlp"], self.rms_norm(x, layer["mlp_norm"]["weight"])))
        x = self.rms_norm(x, p["norm"]["weight"])
        head = p["embed"].T if self.c.tie_embeddings else p["lm_head"]
        return x @ head


def _as_float64(tree):
    if isinstance(tree, dict):
        return {k: _as_float64(v) for k, v in tree.items()}
    if tree is None:
        return None
    return np.asarray(tree, np.float64)
