"""Our engine against openai-whisper (PyTorch, fp32) on the same weights and audio.

The fixtures come from tests/reference/make_fixtures.py (see its docstring).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json

import mlx.core as mx
import numpy as np
import pytest
from speech import REPO, SPEECH_DIR, english_clips, model, other_language_clips, wer

import whisper
from whisper.audio import N_SAMPLES, load_audio

FIXTURES = REPO / "tests" / "fixtures"
REFERENCE = json.loads((FIXTURES / "reference_transcripts.json").read_text())
MODELS = ("tiny.en", "base")
# `whisper.transcribe` is also the function's name; the module is reached by its full name.
transcribe_module = importlib.import_module("whisper.transcribe")
TOLERANCE = 1e-3
# A whole dev-set pass of base takes minutes on two loaded cores: more than the default limit.
DEV_SET_TIMEOUT = 2400


@pytest.mark.parametrize("clip", sorted(REFERENCE["audio"]))
def test_decoded_audio_is_bit_identical(clip):
    audio = load_audio(SPEECH_DIR / clip)
    assert hashlib.sha256(audio.tobytes()).hexdigest() == REFERENCE["audio"][clip]["sha256_f32"]


@pytest.mark.parametrize(
    ("key", "clip", "n_mels"), [("jfk_80", "jfk.flac", 80), ("goforward_128", "ps_goforward.flac", 128)]
)
def test_log_mel_matches(key, clip, n_mels):
    reference = np.load(FIXTURES / "reference_mel.npz")[key]
    ours = np.array(whisper.log_mel_spectrogram(load_audio(SPEECH_DIR / clip), n_mels=n_mels))
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < TOLERANCE


@pytest.mark.parametrize("name", MODELS)
def test_first_decoder_step_logits_match(name):
    fixture = np.load(FIXTURES / f"reference_first_step_{name}.npz")
    audio = np.concatenate([load_audio(SPEECH_DIR / "jfk.flac"), np.zeros(N_SAMPLES, np.float32)])
    mel = whisper.log_mel_spectrogram(audio).T[None, :3000]
    m = model(name)
    features = m.embed_audio(mel)
    assert np.abs(np.array(features[0, :8]) - fixture["audio_features_head"]).max() < TOLERANCE
    logits = np.array(m.logits(mx.array(fixture["initial_tokens"][None]), features)[0, -1])
    assert np.abs(logits - fixture["logits"]).max() < TOLERANCE


def _transcribe_recording_windows(name: str, path: str) -> tuple[dict, list[list[int]]]:
    """Our greedy result, with the tokens (and end-of-text) of every decoded window."""
    eot = whisper.tokenizer.get_tokenizer(model(name).is_multilingual).eot
    windows: list[list[int]] = []
    original = transcribe_module.decode_with_fallback

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        windows.append([*result.tokens, eot])
        return result

    transcribe_module.decode_with_fallback = recording
    try:
        result = whisper.transcribe(model(name), path, language="en", temperature=0.0)
    finally:
        transcribe_module.decode_with_fallback = original
    return result, windows


@functools.cache
def greedy_transcripts(name: str) -> dict[str, tuple[dict, list[list[int]]]]:
    return {clip.file: _transcribe_recording_windows(name, str(clip.path)) for clip in english_clips()}


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.timeout(DEV_SET_TIMEOUT)
@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_match_the_reference(name):
    reference = REFERENCE["models"][name]["greedy"]["clips"]
    ours = greedy_transcripts(name)
    diverged = []
    for clip, (_, windows) in ours.items():
        expected = reference[clip]["windows"]
        for ours_window, reference_window in zip(windows, expected):
            if ours_window != reference_window["tokens"]:
                step = _first_difference(ours_window, reference_window["tokens"])
                gap = reference_window["gaps"][step]
                # A divergence is allowed only where the reference itself was torn between two tokens.
                assert gap is not None and gap < TOLERANCE, (
                    f"{clip}: tokens differ at step {step} where the reference's top-2 gap was {gap}"
                )
                diverged.append(clip)
                break
        else:
            assert len(windows) == len(expected), f"{clip}: {len(windows)} windows, reference {len(expected)}"
    assert len(diverged) <= 1, f"near-tie divergences on {diverged}"


@pytest.mark.timeout(DEV_SET_TIMEOUT)
@pytest.mark.parametrize("name", MODELS)
def test_wer_is_no_worse_than_the_reference(name):
    ours = greedy_transcripts(name)
    clips = english_clips()
    our_wer = wer([c.transcript for c in clips], [ours[c.file][0]["text"] for c in clips])
    reference_wer = 100 * REFERENCE["models"][name]["greedy"]["wer"]
    print(f"{name}: WER ours {our_wer:.2f}%, openai-whisper {reference_wer:.2f}%")
    assert our_wer <= reference_wer + 0.5


@pytest.mark.parametrize("clip", other_language_clips(), ids=lambda c: c.file)
def test_language_detection(clip):
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(load_audio(clip.path)))
    _, probs = whisper.detect_language(model("base"), mel)
    assert max(probs, key=probs.get) == clip.language
    expected = REFERENCE["models"]["base"]["language_detection"][clip.file]["probability"]
    assert probs[clip.language] == pytest.approx(expected, abs=0.01)
    assert whisper.transcribe(model("base"), str(clip.path))["language"] == clip.language
