"""The GPU backend (MLX's CUDA and Metal backends): steps compiled over a fixed-size cache that
MLX's single-query attention kernel reads, and on NVIDIA GPUs one CUDA kernel per product of a
step (`whisper.cuda.fused_linear`, which takes the layer norm, GELU and residual add along).

MLX's single-query attention kernel takes no mask, and without one a step would attend to the
cache's unwritten positions too.  So each head gets HEAD_PAD extra components (64 -> 96, a head
size the kernel takes): queries hold 1 in the first of them, written keys 0, unwritten keys
UNWRITTEN_KEY, which scores those positions far below any other (softmax weight 0).  The
projections come out padded (`padded_projections`), made once when the model loads.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from .. import cuda
from ..model import MultiHeadAttention, Whisper
from . import Cache
from .fused import FusedBackend

HEAD_PAD = 32
UNWRITTEN_KEY = -1e4


def pad_heads(t: mx.array, n_head: int, first: float = 0.0) -> mx.array:
    """t (n_head * head_dim, ...) with HEAD_PAD rows after each head's rows, the first of them
    `first`, the others 0."""
    head_dim = t.shape[0] // n_head
    extra = mx.zeros((n_head, HEAD_PAD, *t.shape[1:]), t.dtype)
    extra[:, 0] = first
    padded = mx.concatenate([t.reshape(n_head, head_dim, *t.shape[1:]), extra], axis=1)
    return padded.reshape(n_head * (head_dim + HEAD_PAD), *t.shape[1:])


def linear_layer(weight: mx.array, bias: mx.array | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def dense_weight(layer: nn.Linear) -> mx.array:
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    return layer.weight


def padded_projections(attention: MultiHeadAttention) -> dict[str, nn.Linear]:
    """Queries, keys and values that come out padded; an output projection that ignores the padding."""
    n = attention.n_head
    value_bias = pad_heads(attention.value.bias, n)
    # Keys and values from one product: the keys' half of its bias is 0 (keys have none).
    return {
        "query": linear_layer(pad_heads(dense_weight(attention.query), n), pad_heads(attention.query.bias, n, 1.0)),
        "key_value": linear_layer(
            mx.concatenate([pad_heads(dense_weight(attention.key), n), pad_heads(dense_weight(attention.value), n)]),
            mx.concatenate([mx.zeros_like(value_bias), value_bias]),
        ),
        "out": linear_layer(mx.contiguous(pad_heads(dense_weight(attention.out).T, n).T), attention.out.bias),
    }


def split_heads(t: mx.array, n_head: int, head: int) -> mx.array:
    """A padded projection's output (batch, n, groups * heads * head) as (batch, groups, heads, n, head)."""
    batch, n, width = t.shape
    groups = width // (n_head * head)
    if n == 1:  # the same memory order: no transposed copy for a step's single token
        return t.reshape(batch, groups, n_head, 1, head)
    return t.reshape(batch, n, groups, n_head, head).transpose(0, 2, 3, 1, 4)


def merge_heads(t: mx.array) -> mx.array:
    batch, n_head, n, head_dim = t.shape
    if n == 1:
        return t.reshape(batch, 1, n_head * head_dim)
    return t.transpose(0, 2, 1, 3).reshape(batch, n, n_head * head_dim)


class GpuBackend(FusedBackend):
    name = "gpu"

    def __init__(self, model: Whisper):
        super().__init__(model)
        attention = model.decoder.blocks[0].attn
        self.head_dim = attention.query.weight.shape[0] // attention.n_head
        self.padded = {id(block): padded_projections(block.attn) for block in model.decoder.blocks}
        mx.eval(self.padded)

    def traced_inputs(self) -> object:
        return [self.model.decoder, list(self.padded.values())]

    def linear(self, layer, x, *, norm=None, residual=None, gelu=False):
        if not isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            norm_arrays = None if norm is None else (norm.weight, norm.bias, norm.eps)
            fused = cuda.fused_linear(
                x, layer.weight, layer.get("bias"), norm=norm_arrays, residual=residual, gelu=gelu
            )
            if fused is not None:
                return fused
        if norm is not None:
            x = norm(x)
        y = layer.as_linear(x) if isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)) else layer(x)
        if gelu:
            y = nn.gelu(y)
        return y if residual is None else residual + y

    def attention(self, q: mx.array, k: mx.array, v: mx.array, n_head: int) -> mx.array:
        batch, n_state = q.shape[0], q.shape[2]
        head_dim = n_state // n_head

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, t.shape[1], n_head, head_dim).transpose(0, 2, 1, 3)

        out = mx.fast.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=head_dim**-0.5)
        return merge_heads(out)

    def new_cache(self, rows: int) -> Cache:
        n_head = self.model.decoder.blocks[0].attn.n_head
        n_ctx = self.model.decoder.positional_embedding.shape[0]
        dtype = self.model.decoder.ln.weight.dtype  # never quantized, unlike the embedding
        shape = (rows, n_head, n_ctx, self.head_dim + HEAD_PAD)
        keys = mx.zeros(shape, dtype)
        keys[..., self.head_dim] = UNWRITTEN_KEY
        return [(mx.array(keys), mx.zeros(shape, dtype)) for _ in self.model.decoder.blocks]

    def written(self, t: mx.array, n_cached: int) -> tuple:
        return (slice(None), slice(None), slice(0, n_cached))

    def forget(self, cache: Cache, n_kept: int) -> Cache:
        for keys, _ in cache:
            keys[:, :, n_kept:, self.head_dim] = UNWRITTEN_KEY
        return cache

    def self_attend(self, block, x, cache, offset):
        padded = self.padded[id(block)]
        n_head, head = block.attn.n_head, self.head_dim + HEAD_PAD
        n = x.shape[1]
        q = split_heads(self.linear(padded["query"], x, norm=block.attn_ln), n_head, head).squeeze(1)
        key_value = split_heads(self.linear(padded["key_value"], x, norm=block.attn_ln), n_head, head)
        k = mx.slice_update(cache[0], key_value[:, 0], offset, axes=(2,))
        v = mx.slice_update(cache[1], key_value[:, 1], offset, axes=(2,))
        mask = None
        if n > 1:
            after = mx.arange(k.shape[2])[None] > (offset + mx.arange(n))[:, None]
            mask = mx.where(after, -mx.inf, 0.0).astype(x.dtype)
        attended = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.linear(padded["out"], merge_heads(attended), residual=x), (k, v)
