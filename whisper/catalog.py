"""Every Whisper model known by name: its shape, the Hugging Face repo that publishes it, and the
cross-attention heads that align its words with the audio.

The shapes and alignment heads are openai-whisper's (its model table and `_ALIGNMENT_HEADS`) and
distil-whisper's (OpenAI's encoders, with 2 or 4 decoder layers).  A checkpoint's own config
still decides the shape it loads with; the table gives the names, the repos to fetch them from,
and shapes for benchmarks and tests.

Alignment heads, where openai-whisper names none for a model, are the last half of the decoder
layers, every head of each (openai-whisper's own default, `Whisper.__init__` in `whisper.model`),
unless the checkpoint's config lists its own (`alignment_heads`, as Hugging Face's
generation_config.json does).
"""

from __future__ import annotations

import base64
import gzip
from dataclasses import dataclass

import numpy as np

from .model import ModelDimensions


@dataclass(frozen=True)
class KnownModel:
    dims: ModelDimensions
    repo: str  # Hugging Face repo id, in transformers' layout (model.safetensors + config.json)
    # openai-whisper's mask of alignment heads: a gzipped (n_text_layer, n_text_head) boolean
    # array in base85; None where openai-whisper names none.
    alignment_mask: bytes | None = None

    @property
    def alignment_heads(self) -> list[list[int]] | None:
        """[layer, head] pairs, or None for the default."""
        if self.alignment_mask is None:
            return None
        mask = np.frombuffer(gzip.decompress(base64.b85decode(self.alignment_mask)), dtype=bool)
        mask = mask.reshape(self.dims.n_text_layer, self.dims.n_text_head)
        return np.argwhere(mask).tolist()


def _dims(n_mels: int, n_vocab: int, size: tuple[int, int, int], text_layers: int | None) -> ModelDimensions:
    """Whisper's shape: 1500 audio positions, 448 text positions, 64-wide heads everywhere; the
    decoder as deep as the encoder unless `text_layers` says otherwise."""
    state, heads, layers = size
    return ModelDimensions(
        n_mels=n_mels,
        n_audio_ctx=1500,
        n_audio_state=state,
        n_audio_head=heads,
        n_audio_layer=layers,
        n_vocab=n_vocab,
        n_text_ctx=448,
        n_text_state=state,
        n_text_head=heads,
        n_text_layer=text_layers or layers,
    )


ENGLISH, MULTILINGUAL, V3 = 51864, 51865, 51866  # vocabularies: 0, 99 and 100 languages
# (state, heads, layers) of each size
TINY, BASE, SMALL, MEDIUM, LARGE = (384, 6, 4), (512, 8, 6), (768, 12, 12), (1024, 16, 24), (1280, 20, 32)

# name: (mel bins, vocabulary, size, decoder layers if fewer than the encoder's, Hugging Face repo)
_MODELS = {
    "tiny.en": (80, ENGLISH, TINY, None, "openai/whisper-tiny.en"),
    "tiny": (80, MULTILINGUAL, TINY, None, "openai/whisper-tiny"),
    "base.en": (80, ENGLISH, BASE, None, "openai/whisper-base.en"),
    "base": (80, MULTILINGUAL, BASE, None, "openai/whisper-base"),
    "small.en": (80, ENGLISH, SMALL, None, "openai/whisper-small.en"),
    "small": (80, MULTILINGUAL, SMALL, None, "openai/whisper-small"),
    "medium.en": (80, ENGLISH, MEDIUM, None, "openai/whisper-medium.en"),
    "medium": (80, MULTILINGUAL, MEDIUM, None, "openai/whisper-medium"),
    "large-v1": (80, MULTILINGUAL, LARGE, None, "openai/whisper-large"),
    "large-v2": (80, MULTILINGUAL, LARGE, None, "openai/whisper-large-v2"),
    "large-v3": (128, V3, LARGE, None, "openai/whisper-large-v3"),
    # openai-whisper's "large" has meant large-v3 since large-v3 came out.
    "large": (128, V3, LARGE, None, "openai/whisper-large-v3"),
    "large-v3-turbo": (128, V3, LARGE, 4, "openai/whisper-large-v3-turbo"),
    "turbo": (128, V3, LARGE, 4, "openai/whisper-large-v3-turbo"),
    "distil-small.en": (80, ENGLISH, SMALL, 4, "distil-whisper/distil-small.en"),
    "distil-medium.en": (80, ENGLISH, MEDIUM, 2, "distil-whisper/distil-medium.en"),
    "distil-large-v2": (80, MULTILINGUAL, LARGE, 2, "distil-whisper/distil-large-v2"),
    "distil-large-v3": (128, V3, LARGE, 2, "distil-whisper/distil-large-v3"),
    "distil-large-v3.5": (128, V3, LARGE, 2, "distil-whisper/distil-large-v3.5"),
}

# openai-whisper's alignment heads (its `_ALIGNMENT_HEADS`).
_ALIGNMENT_MASKS = {
    "tiny.en": b"ABzY8J1N>@0{>%R00Bk>$p{7v037`oCl~+#00",
    "tiny": b"ABzY8bu8Lr0{>%RKn9Fp%m@SkK7Kt=7ytkO",
    "base.en": b"ABzY8;40c<0{>%RzzG;p*o+Vo09|#PsxSZm00",
    "base": b"ABzY8KQ!870{>%RzyTQH3`Q^yNP!>##QT-<FaQ7m",
    "small.en": b"ABzY8>?_)10{>%RpeA61k&I|OI3I$65C{;;pbCHh0B{qLQ;+}v00",
    "small": b"ABzY8DmU6=0{>%Rpa?J`kvJ6qF(V^F86#Xh7JUGMK}P<N0000",
    "medium.en": b"ABzY8usPae0{>%R7<zz_OvQ{)4kMa0BMw6u5rT}kRKX;$NfYBv00*Hl@qhsU00",
    "medium": b"ABzY8B0Jh+0{>%R7}kK1fFL7w6%<-Pf*t^=N)Qr&0RR9",
    "large-v1": b"ABzY8r9j$a0{>%R7#4sLmoOs{s)o3~84-RPdcFk!JR<kSfC2yj",
    "large-v2": b"ABzY8zd+h!0{>%R7=D0pU<_bnWW*tkYAhobTNnu$jnkEkXqp)j;w1Tzk)UH3X%SZd&fFZ2fC2yj",
    "large-v3": b"ABzY8gWO1E0{>%R7(9S+Kn!D~%ngiGaR?*L!iJG9p-nab0JQ=-{D1-g00",
    "large": b"ABzY8gWO1E0{>%R7(9S+Kn!D~%ngiGaR?*L!iJG9p-nab0JQ=-{D1-g00",
    "large-v3-turbo": b"ABzY8j^C+e0{>%RARaKHP%t(lGR*)0g!tONPyhe`",
    "turbo": b"ABzY8j^C+e0{>%RARaKHP%t(lGR*)0g!tONPyhe`",
}

KNOWN_MODELS: dict[str, KnownModel] = {
    name: KnownModel(_dims(n_mels, n_vocab, size, text_layers), repo, _ALIGNMENT_MASKS.get(name))
    for name, (n_mels, n_vocab, size, text_layers, repo) in _MODELS.items()
}
