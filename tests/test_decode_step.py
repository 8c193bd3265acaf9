"""The decoder's step over its fixed-size cache against a plain pass over the whole sequence."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from speech import SPEECH_DIR

import whisper
from whisper.audio import N_SAMPLES, load_audio
from whisper.decoding import Inference
from whisper.model import TextDecoder

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def traced_model():
    """tiny.en loaded while its decoder's step counts how often MLX traces it."""
    calls = []
    original = TextDecoder._step

    def counting(self, *args):
        calls.append(args[0].shape)
        return original(self, *args)

    TextDecoder._step = counting
    try:
        model = whisper.load_model("tiny.en")
    finally:
        TextDecoder._step = original
    audio = load_audio(SPEECH_DIR / "jfk.flac")
    mel = whisper.log_mel_spectrogram(np.concatenate([audio, np.zeros(N_SAMPLES - len(audio), np.float32)]))
    return model, model.embed_audio(mel.T[None, :3000]), calls


def test_steps_give_the_logits_of_a_whole_pass_and_trace_once(traced_model):
    model, features, calls = traced_model
    rng = np.random.default_rng(3)
    # Two sequences that share their start.
    tokens = np.concatenate([[[50257, 50362]] * 2, rng.integers(0, 50256, size=(2, 40))], axis=1)
    tokens[1, :5] = tokens[0, :5]
    features = mx.repeat(features, 2, axis=0)
    inference = Inference(model, features)
    stepped = [inference.logits(tokens[:, :3], positions=3)]
    stepped += [inference.logits(tokens[:, : n + 1]) for n in range(3, tokens.shape[1])]
    stepped = np.concatenate(stepped, axis=1)
    whole = np.array(model.logits(mx.array(tokens), features))
    assert np.abs(stepped - whole).max() < TOLERANCE
    assert len(calls) == 1, f"the step was traced {len(calls)} times"


def test_a_kept_prefix_of_the_cache_decodes_on_from_there(traced_model):
    model, features, _ = traced_model
    tokens = np.array([[50257, 50362, 400, 523, 616, 7875, 7840]])
    inference = Inference(model, features)
    inference.logits(tokens, positions=tokens.shape[1])
    # Keep the first four positions (as the streaming transcriber does with an accepted guess).
    inference.cache = [(k[:, :4], v[:, :4]) for k, v in inference.cache]
    inference.n_cached = 4
    other = np.array([[*tokens[0, :4], 1029]])
    expected = np.array(model.logits(mx.array(other), features))[:, -1:]
    assert np.abs(inference.logits(other) - expected).max() < TOLERANCE


def test_the_step_uses_the_weights_it_is_given(traced_model):
    model = whisper.load_model("tiny.en")
    inference = Inference(model, traced_model[1])
    tokens = np.array([[50257, 50362, 400]])
    inference.logits(tokens[:, :2], positions=2)
    before = inference.logits(tokens)
    # Weights replaced after the first trace (a conversion, a reload) must be the ones used.
    model.decoder.ln.weight = model.decoder.ln.weight * 2
    again = Inference(model, traced_model[1])
    again.logits(tokens[:, :2], positions=2)
    after = again.logits(tokens)
    expected = np.array(model.logits(mx.array(tokens), traced_model[1]))[:, -1:]
    assert np.abs(after - expected).max() < TOLERANCE
    assert np.abs(after - before).max() > 1
