"""Batched transcription (whisper.batch) and the device choice, on the CPU with tiny.en.

Batched text must equal unbatched text under the same options (greedy, no conditioning
on previous text); the GPU side of both is checked by bench/gpu_speed.py --check.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import pytest
from speech import SPEECH_DIR, model

import whisper
from whisper.audio import AudioError, load_audio
from whisper.cli import main

NAME = "tiny.en"
CLIPS = ["jfk.flac", "ps_cards_005.wav", "lj_LJ001-0001.flac", "ps_goforward.flac"]
OPTIONS = {"language": "en", "temperature": 0.0, "condition_on_previous_text": False}


@functools.cache
def long_waveform() -> np.ndarray:
    """Two clips joined (38 s): a file of two windows, the second starting where the first's text ended."""
    return np.concatenate([load_audio(SPEECH_DIR / "mfa_acoustic_corpus.wav"), load_audio(SPEECH_DIR / "jfk.flac")])


def sources() -> list:
    return [str(SPEECH_DIR / clip) for clip in CLIPS[:2]] + [long_waveform()] + [str(SPEECH_DIR / c) for c in CLIPS[2:]]


@functools.cache
def unbatched() -> tuple[dict, ...]:
    return tuple(whisper.transcribe(model(NAME), source, **OPTIONS) for source in sources())


def test_batched_text_equals_unbatched_text_per_file():
    finished = []
    results = whisper.transcribe_batch(
        model(NAME), sources(), batch_size=3, on_result=lambda i, _: finished.append(i), **OPTIONS
    )
    assert sorted(finished) == list(range(len(sources())))
    for single, batched in zip(unbatched(), results):
        assert batched["text"] == single["text"]
        assert [s["tokens"] for s in batched["segments"]] == [s["tokens"] for s in single["segments"]]
        assert [(s["start"], s["end"]) for s in batched["segments"]] == [
            (s["start"], s["end"]) for s in single["segments"]
        ]
    assert len({s["seek"] for s in results[2]["segments"]}) == 2  # the long file took two windows
    assert "fellow Americans" in results[2]["text"]


def test_batch_of_one_and_batch_larger_than_the_files_agree():
    small = whisper.transcribe_batch(model(NAME), sources()[:2], batch_size=1, **OPTIONS)
    large = whisper.transcribe_batch(model(NAME), sources()[:2], batch_size=8, **OPTIONS)
    assert [r["text"] for r in small] == [r["text"] for r in large] == [r["text"] for r in unbatched()[:2]]


def test_unreadable_file_is_skipped_or_raised(tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    audios = [str(broken), str(SPEECH_DIR / "ps_goforward.flac")]
    errors = []
    results = whisper.transcribe_batch(
        model(NAME), audios, batch_size=2, on_error=lambda i, e: errors.append((i, e)), **OPTIONS
    )
    assert results[0] is None and results[1]["text"] == unbatched()[-1]["text"]
    assert [i for i, _ in errors] == [0] and isinstance(errors[0][1], AudioError)
    with pytest.raises(AudioError):
        whisper.transcribe_batch(model(NAME), audios, **OPTIONS)
    with pytest.raises(ValueError, match="batch_size"):
        whisper.transcribe_batch(model(NAME), audios, batch_size=0)


def test_command_line_batches_files(tmp_path, capsys):
    files = [str(SPEECH_DIR / clip) for clip in CLIPS[:2]]
    greedy = ["--beam-size", "None", "--temperature-increment-on-fallback", "None"]
    code = main([*files, "--model", NAME, "--batch-size", "2", *greedy, "-f", "txt", "-o", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    for clip, single in zip(CLIPS[:2], unbatched()):
        written = (tmp_path / f"{clip.rsplit('.', 1)[0]}.txt").read_text()
        assert written.split() == single["text"].split()
        assert single["text"].strip() in printed


def test_device_choice_on_a_machine_without_gpu(capsys):
    assert not mx.is_available(mx.gpu)
    cpu_model = whisper.load_model(NAME, device="cpu")
    assert cpu_model.dtype == mx.float32 and mx.default_device() == mx.cpu
    with pytest.raises(ValueError, match=r"requirements-cuda\.txt"):
        whisper.load_model(NAME, device="gpu")
    with pytest.raises(ValueError, match="'cpu' or 'gpu'"):
        whisper.load_model(NAME, device="tpu")
    assert mx.default_device() == mx.cpu
    assert main([str(SPEECH_DIR / "ps_goforward.flac"), "--model", NAME, "--device", "gpu"]) == 1
    assert "requirements-cuda.txt" in capsys.readouterr().err
    text = whisper.transcribe(cpu_model, str(SPEECH_DIR / "ps_goforward.flac"), device="cpu", **OPTIONS)["text"]
    assert text == unbatched()[-1]["text"]


def test_quantized_model_decodes():
    quantized = whisper.load_model(NAME, quantize=8, device="cpu")
    text = whisper.transcribe(quantized, str(SPEECH_DIR / "jfk.flac"), **OPTIONS)["text"]
    assert "fellow Americans" in text


def test_half_precision_weights_compute_in_half_precision():
    """What the GPU gets (fp16): every layer computes in fp16, none promoted back to fp32."""
    half = whisper.load_model(NAME, dtype=mx.float16, device="cpu")
    features = half.embed_audio(mx.zeros((1, 200, half.dims.n_mels)), partial=True)
    assert features.dtype == mx.float16
    logits, _, _ = half.decoder(mx.array([[50257]]), features)
    assert logits.dtype == mx.float16
