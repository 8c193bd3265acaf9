"""What the CPU kernels' and the GPU's backends share: the model's passes over a fixed-size
self-attention cache, written in place by position so that every step has the same shapes and
`mx.compile` traces it once; each product with its layer norm, GELU and residual add fused in
where the backend can (`linear`).  Each backend brings its products, attentions and cache layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx
from mlx import nn

from ..model import ResidualAttentionBlock
from . import AudioMemory, Backend, Cache


class FusedBackend(Backend):
    chooses_on_device = True  # greedy choices where the logits are, steps sent ahead of the host

    # ------------------------------------------------------------ what each backend brings

    def linear(
        self,
        layer: nn.Module,
        x: mx.array,
        *,
        norm: nn.LayerNorm | None = None,
        residual: mx.array | None = None,
        gelu: bool = False,
    ) -> mx.array:
        """`layer(norm(x))`, then exact GELU, then plus `residual`, as asked; an embedding
        multiplies by its transpose."""
        raise NotImplementedError

    def layer_norm(self, x: mx.array, norm: nn.LayerNorm) -> mx.array:
        return norm(x)

    def attention(self, q: mx.array, k: mx.array, v: mx.array, n_head: int) -> mx.array:
        """Attention of q (batch, queries, state) over k, v (batch, keys, state), heads merged."""
        raise NotImplementedError

    def convolve_gelu(self, conv: nn.Conv1d, x: mx.array) -> mx.array:
        return nn.gelu(conv(x))

    def self_attend(
        self, block: ResidualAttentionBlock, x: mx.array, cache: tuple[mx.array, mx.array], offset: mx.array
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """x plus its self-attention at positions `offset` onwards over the layer's cache, whose
        updated version comes back too (x's keys and values written there)."""
        raise NotImplementedError

    def cross_keys_values(self, audio: AudioMemory, layer: int) -> tuple[mx.array, mx.array]:
        """A decoder layer's keys and values of the audio, (audio, frames, state) each."""
        return audio[layer]

    # ------------------------------------------------------------------- shared passes

    def encode(self, mel: mx.array, *, partial: bool = False) -> mx.array:
        encoder = self.model.encoder
        x = self.convolve_gelu(encoder.conv2, self.convolve_gelu(encoder.conv1, mel))
        x = encoder.positions(x, partial=partial)
        for block in encoder.blocks:
            h = self.layer_norm(x, block.attn_ln)
            attn = block.attn
            q, k, v = self.linear(attn.query, h), self.linear(attn.key, h), self.linear(attn.value, h)
            x = self.linear(attn.out, self.attention(q, k, v, attn.n_head), residual=x)
            x = self.mlp(block, x)
        return self.layer_norm(x, encoder.ln_post)

    def audio_memory(self, features: mx.array, group: int = 1) -> AudioMemory:
        memory = [
            (self.linear(b.cross_attn.key, features), self.linear(b.cross_attn.value, features))
            for b in self.model.decoder.blocks
        ]
        mx.eval(memory)
        return memory

    def cross_attend(self, block: ResidualAttentionBlock, x: mx.array, keys: mx.array, values: mx.array) -> mx.array:
        """x plus its cross-attention over one window's keys and values per `x.shape[0] //
        keys.shape[0]` rows (a window's beams or samples): their queries go together."""
        rows, n, state = x.shape
        q = self.linear(block.cross_attn.query, x, norm=block.cross_attn_ln)
        attended = self.attention(q.reshape(keys.shape[0], -1, state), keys, values, block.cross_attn.n_head)
        return self.linear(block.cross_attn.out, attended.reshape(rows, n, state), residual=x)

    def mlp(self, block: ResidualAttentionBlock, x: mx.array) -> mx.array:
        return self.linear(block.mlp2, self.linear(block.mlp1, x, norm=block.mlp_ln, gelu=True), residual=x)

    def unembed(self, x: mx.array) -> mx.array:
        decoder = self.model.decoder
        return self.linear(decoder.token_embedding, x, norm=decoder.ln)

    def forward(
        self, tokens: mx.array, audio: AudioMemory, cache: Cache, offset: int | mx.array, positions: int | None = None
    ) -> tuple[mx.array, Cache]:
        if isinstance(offset, int):
            offset = mx.array([offset], dtype=mx.int32)
        decoder = self.model.decoder
        x = decoder.embed(tokens, offset)
        new_cache = []
        for layer, (block, layer_cache) in enumerate(zip(decoder.blocks, cache)):
            x, layer_cache = self.self_attend(block, x, layer_cache, offset)
            x = self.mlp(block, self.cross_attend(block, x, *self.cross_keys_values(audio, layer)))
            new_cache.append(layer_cache)
        if positions is not None:
            x = x[:, -positions:]
        return self.unembed(x), new_cache

    def step(self, tokens: mx.array, audio: AudioMemory, cache: Cache, offset: mx.array) -> tuple[mx.array, Cache]:
        return self._compiled_step(tokens, audio, cache, offset)

    def traced_inputs(self) -> object:
        """The arrays a step reads besides its arguments: inputs of the trace, not constants."""
        return self.model.decoder

    @functools.cached_property
    def _compiled_step(self) -> Callable:
        # The weights are inputs of the trace, not constants: converting them later counts.
        return mx.compile(self._step, inputs=self.traced_inputs())

    def _step(self, tokens: mx.array, audio: AudioMemory, cache: Cache, offset: mx.array) -> tuple[mx.array, Cache]:
        logits, cache = self.forward(tokens, audio, cache, offset, positions=1)
        return logits[:, 0], cache

    @functools.cache  # noqa: B019  (one compiled function per `then`, kept as long as the backend)
    def step_then(self, then: Callable) -> Callable:
        def stepped(tokens: mx.array, audio: AudioMemory, cache: Cache, offset: mx.array, *extra: mx.array):
            logits, cache = self._step(tokens, audio, cache, offset)
            return then(logits, *extra), cache

        return mx.compile(stepped, inputs=self.traced_inputs())

    def written(self, t: mx.array, n_cached: int) -> tuple:
        """The index of a cache array's first `n_cached` positions, for every row."""
        return (slice(None), slice(0, n_cached))

    def reorder(self, cache: Cache, sources: list[int], n_cached: int) -> Cache:
        # Only the written positions: the rest is never read before it is written again.
        index = mx.array(sources)
        target = cache if len(sources) == cache[0][0].shape[0] else self.new_cache(len(sources))
        reordered = []
        for layer, into in zip(cache, target):
            arrays = []
            for t, fresh in zip(layer, into):
                written = self.written(t, n_cached)
                fresh[written] = t[(index, *written[1:])]
                arrays.append(fresh)
            reordered.append(tuple(arrays))
        return reordered
