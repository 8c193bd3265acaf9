"""`load_model(..., quantize=8)` on the CPU kernels' backend, with the bundled real weights: what it
quantizes, its encoder (8-bit weights times 8-bit activations, `kernels.quantized_product`)
against the plain backend's quantized model, and its transcripts against float32's."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from speech import SPEECH_DIR, wer
from speech import clip as speech_clip

import whisper
from whisper import kernels
from whisper.audio import N_SAMPLES, load_audio
from whisper.backends import Backend, backend_type
from whisper.backends.cpu import CpuBackend

needs_kernels = pytest.mark.skipif(os.environ.get("MENNY_NO_KERNELS") == "1", reason="MENNY_NO_KERNELS=1")
CLIPS = ("jfk.flac", "ls_1272-128104-0000.wav", "librivox_sns01_0870.wav", "lj_LJ001-0001.flac")


def window(name: str, n_mels: int, frames: int = 3000) -> mx.array:
    """A clip's first `frames` log-mel frames (100 a second; 30 s padded at most), as the
    encoder's input (1, frames, n_mels)."""
    audio = load_audio(SPEECH_DIR / name)[:N_SAMPLES]
    padded = np.concatenate([audio, np.zeros(N_SAMPLES - len(audio), np.float32)])
    return whisper.log_mel_spectrogram(padded, n_mels).T[None, :frames]


@needs_kernels
def test_eight_bits_on_the_kernels_backend_quantize_the_encoder_s_linear_layers_alone():
    model = whisper.load_model("tiny.en", quantize=8, device="cpu")
    assert isinstance(model.backend, CpuBackend)
    encoder = [m for m in model.encoder.modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    assert encoder and all(isinstance(m, nn.QuantizedLinear) and m.bits == 8 for m in encoder)
    assert all(kernels.multiplies_quantized(m) for m in encoder)
    # The decoder as float32 loads it, its matrices kept in float16 for the step kernel.
    decoder = list(model.decoder.modules())
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in decoder)
    assert model.decoder.blocks[0].mlp1.weight.dtype == mx.float16


def test_other_bits_and_the_plain_backend_quantize_every_layer():
    model = whisper.load_model("tiny.en", quantize=4, device="cpu")
    assert isinstance(model.decoder.token_embedding, nn.QuantizedEmbedding)
    assert all(isinstance(m, nn.QuantizedLinear) for m in (model.encoder.blocks[0].mlp1, model.decoder.blocks[0].mlp1))
    plain = whisper.load_model("tiny.en", device="cpu")
    Backend.quantize(plain, 8)
    assert isinstance(plain.decoder.token_embedding, nn.QuantizedEmbedding)
    assert backend_type(mx.cpu, kernels=False) is Backend


@needs_kernels
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_the_quantized_encoder_is_close_to_the_plain_backend_s_quantized_model(name):
    ours = whisper.load_model(name, quantize=8, device="cpu")
    plain = whisper.load_model(name, device="cpu")
    Backend.quantize(plain, 8)
    plain.backend = Backend(plain)
    # jfk.flac's 11 s and some silence (MLX's quantized products, the plain model's, are slow here).
    mel = window("jfk.flac", ours.dims.n_mels, frames=1200)
    features, reference = (np.array(m.embed_audio(mel, partial=True))[0] for m in (ours, plain))
    # Only the activations' rounding to int8 differs (the plain model multiplies float x).
    assert np.sqrt(((features - reference) ** 2).mean() / (reference**2).mean()) < 0.1
    cosine = (features * reference).sum(-1) / np.linalg.norm(features, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert np.median(cosine) > 0.999
    # A live transcript's first frames: too few rows for the kernel, MLX's quantized products run.
    partial = ours.embed_audio(mx.zeros((1, 8, ours.dims.n_mels)), partial=True)
    assert partial.shape == (1, 4, ours.dims.n_audio_state)


@needs_kernels
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_eight_bit_transcripts_are_float32_s_within_the_noise(name):
    options = {"language": "en", "temperature": 0.0}
    texts = {}
    for bits in (None, 8):
        model = whisper.load_model(name, quantize=bits, device="cpu")
        texts[bits] = [whisper.transcribe(model, str(SPEECH_DIR / clip), **options)["text"] for clip in CLIPS]
    assert texts[8][0] == texts[None][0]  # jfk.flac
    references = [speech_clip(clip).transcript for clip in CLIPS]
    assert abs(wer(references, texts[8]) - wer(references, texts[None])) <= 2.0
