"""Whisper's encoder-decoder Transformer in MLX, written as the paper and openai-whisper describe it.

This is the plain model: every backend (`whisper.backends`) runs these weights, and this code is
what their faster passes are tested against.  Parameter names follow openai-whisper's, except the
MLP layers (`mlp1`, `mlp2`), and arrays are channels-last as MLX expects: a mel input is (batch,
frames, n_mels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from mlx import nn

if TYPE_CHECKING:
    from .backends import Backend

# Per decoder layer, the keys and values of the tokens so far, (batch, tokens, state) each.
KVCache = list[tuple[mx.array, mx.array]]


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed encoder positions: sines then cosines over log-spaced timescales."""
    log_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-log_increment * np.arange(channels // 2))
    scaled_time = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


def causal_mask(n_queries: int, n_keys: int, dtype: mx.Dtype) -> mx.array:
    """Additive mask for the last `n_queries` of `n_keys` positions: each sees itself and those before."""
    later = mx.arange(n_keys)[None] > mx.arange(n_keys - n_queries, n_keys)[:, None]
    return mx.where(later, -mx.inf, 0.0).astype(dtype)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def __call__(
        self,
        x: mx.array,
        xa: mx.array | None = None,
        mask: mx.array | None = None,
        kv_cache: tuple[mx.array, mx.array] | None = None,
    ) -> tuple[mx.array, tuple[mx.array, mx.array], mx.array]:
        """Attention of x's queries: over x itself (after the cached keys and values), or over the
        audio xa (whose keys and values, once computed, are the cache).  Returns the output, the
        keys and values attended to, and the attention logits (batch, heads, queries, keys)."""
        q = self.query(x)
        if xa is None:
            k, v = self.key(x), self.value(x)
            if kv_cache is not None:
                k = mx.concatenate([kv_cache[0], k], axis=1)
                v = mx.concatenate([kv_cache[1], v], axis=1)
        elif kv_cache is None:
            k, v = self.key(xa), self.value(xa)
        else:
            k, v = kv_cache
        out, qk = self.qkv_attention(q, k, v, mask)
        return self.out(out), (k, v), qk

    def qkv_attention(
        self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None
    ) -> tuple[mx.array, mx.array]:
        batch, n_ctx, n_state = q.shape
        scale = (n_state // self.n_head) ** -0.25
        q = q.reshape(batch, n_ctx, self.n_head, -1).transpose(0, 2, 1, 3) * scale
        k = k.reshape(batch, k.shape[1], self.n_head, -1).transpose(0, 2, 3, 1) * scale
        v = v.reshape(batch, v.shape[1], self.n_head, -1).transpose(0, 2, 1, 3)
        qk = q @ k
        if mask is not None:
            qk = qk + mask
        w = mx.softmax(qk.astype(mx.float32), axis=-1, precise=True).astype(q.dtype)
        out = (w @ v).transpose(0, 2, 1, 3).reshape(batch, n_ctx, n_state)
        return out, qk


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp1 = nn.Linear(n_state, 4 * n_state)
        self.mlp2 = nn.Linear(4 * n_state, n_state)
        self.mlp_ln = nn.LayerNorm(n_state)

    def __call__(
        self,
        x: mx.array,
        xa: mx.array | None = None,
        mask: mx.array | None = None,
        kv_cache: tuple | None = None,
    ) -> tuple[mx.array, tuple, mx.array | None]:
        """The block; `kv_cache` is (self-attention's, cross-attention's) keys and values.
        Returns x, the updated caches, and the cross-attention logits."""
        self_kv, cross_kv = kv_cache or (None, None)
        y, self_kv, _ = self.attn(self.attn_ln(x), mask=mask, kv_cache=self_kv)
        x = x + y
        cross_qk = None
        if self.cross_attn is not None:
            y, cross_kv, cross_qk = self.cross_attn(self.cross_attn_ln(x), xa, kv_cache=cross_kv)
            x = x + y
        x = x + self.mlp2(nn.gelu(self.mlp1(self.mlp_ln(x))))
        return x, (self_kv, cross_kv), cross_qk


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self._positional_embedding = mx.array(sinusoids(n_ctx, n_state))
        self.blocks = [ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)]
        self.ln_post = nn.LayerNorm(n_state)

    def positions(self, x: mx.array, *, partial: bool = False) -> mx.array:
        """x (batch, frames, state) after the convolutions, plus the positions; with `partial`, x may
        be the first frames of a window only."""
        n_ctx = self._positional_embedding.shape[0]
        if x.shape[1] > n_ctx or (x.shape[1] < n_ctx and not partial):
            raise ValueError(f"the encoder takes 30-second windows (3000 frames); got {2 * x.shape[1]} frames")
        # The positions are not a parameter, so they stay float32: cast, or fp16 weights compute in fp32.
        return x + self._positional_embedding[: x.shape[1]].astype(x.dtype)

    def __call__(self, mel: mx.array, *, partial: bool = False) -> mx.array:
        """Features of a 30-second window; with `partial`, of its first frames only (an even number)."""
        x = nn.gelu(self.conv1(mel))
        x = nn.gelu(self.conv2(x))
        x = self.positions(x, partial=partial)
        for block in self.blocks:
            x, _, _ = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = mx.zeros((n_ctx, n_state))
        self.blocks = [ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)]
        self.ln = nn.LayerNorm(n_state)

    def embed(self, tokens: mx.array, offset: int | mx.array) -> mx.array:
        """Token embeddings plus the positions from `offset` (an int or an int32 array of one element) on."""
        positions = self.positional_embedding[offset + mx.arange(tokens.shape[-1])]
        return self.token_embedding(tokens).astype(positions.dtype) + positions

    def unembed(self, x: mx.array) -> mx.array:
        """Logits over the vocabulary: the embedding's transpose, after the last layer norm."""
        return self.token_embedding.as_linear(self.ln(x))

    def __call__(
        self, tokens: mx.array, xa: mx.array, kv_cache: list | None = None
    ) -> tuple[mx.array, list, list[mx.array]]:
        """Logits of every position of `tokens` (batch, n) after those cached, the updated caches
        (per layer: self-attention's and cross-attention's keys and values), and each layer's
        cross-attention logits."""
        offset = kv_cache[0][0][0].shape[1] if kv_cache else 0  # the cached self-attention keys
        x = self.embed(tokens, offset)
        n = tokens.shape[-1]
        mask = causal_mask(n, offset + n, x.dtype) if n > 1 else None
        kv_cache = kv_cache or [None] * len(self.blocks)
        cross_qk = []
        for i, block in enumerate(self.blocks):
            x, kv_cache[i], qk = block(x, xa, mask, kv_cache[i])
            cross_qk.append(qk)
        return self.unembed(x), kv_cache, cross_qk


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions, alignment_heads: list[list[int]] | None = None):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
        )
        self.decoder = TextDecoder(
            dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer
        )
        # By default the last half of the decoder layers align words with audio.
        self.alignment_heads = alignment_heads or [
            [layer, head]
            for layer in range(dims.n_text_layer // 2, dims.n_text_layer)
            for head in range(dims.n_text_head)
        ]
        # How the decoding runs these weights; `whisper.backends.prepare` sets it when the model loads.
        self.backend: Backend | None = None

    @property
    def is_multilingual(self) -> bool:
        return self.dims.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.dims.n_vocab - 51765 - int(self.is_multilingual)

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.conv1.weight.dtype  # never quantized

    def embed_audio(self, mel: mx.array, *, partial: bool = False) -> mx.array:
        """The encoder's features of (batch, frames, n_mels) windows, through the model's backend."""
        mel = mel.astype(self.dtype)
        if self.backend is None:
            return self.encoder(mel, partial=partial)
        return self.backend.encode(mel, partial=partial)

    def logits(self, tokens: mx.array, audio_features: mx.array) -> mx.array:
        logits, _, _ = self.decoder(tokens, audio_features)
        return logits

    def __call__(self, mel: mx.array, tokens: mx.array) -> mx.array:
        return self.logits(tokens, self.embed_audio(mel))
