"""openai-whisper's README run as written (its model names swapped for the bundled ones), and its
command line with openai's option spellings."""

from __future__ import annotations

import subprocess
import sys

from speech import REPO, SPEECH_DIR, model

import whisper
from whisper import cli

JFK = SPEECH_DIR / "jfk.flac"

OPENAI_README = """
import whisper

model = whisper.load_model("base")
result = model.transcribe({audio!r})
print(result["text"])

model = whisper.load_model("base")

# load audio and pad/trim it to fit 30 seconds
audio = whisper.load_audio({audio!r})
audio = whisper.pad_or_trim(audio)

# make log-Mel spectrogram and move to the same device as the model
mel = whisper.log_mel_spectrogram(audio, n_mels=model.dims.n_mels).to(model.device)

# detect the spoken language
_, probs = model.detect_language(mel)
print(f"Detected language: {{max(probs, key=probs.get)}}")

# decode the audio
options = whisper.DecodingOptions()
result = whisper.decode(model, mel, options)

# print the recognized text
print(result.text)
"""


def test_openai_readme_examples():
    script = OPENAI_README.format(audio=str(JFK))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    transcribed, detected, decoded = out.stdout.splitlines()
    assert transcribed == whisper.transcribe(model("base"), str(JFK))["text"]
    assert detected == "Detected language: en"
    assert decoded == transcribed.strip()


def test_command_line_with_openai_spellings(tmp_path):
    """The issue's command, then our spellings of it in this process: the same file."""
    openai_args = ["--model", "base", "--output_format", "srt", "--output_dir", str(tmp_path / "openai")]
    openai_args += ["--word_timestamps", "True", "--beam_size", "5", "--fp16", "False", "--threads", "2"]
    out = subprocess.run(
        [sys.executable, "-m", "whisper", str(JFK), *openai_args], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert [p.name for p in (tmp_path / "openai").iterdir()] == ["jfk.srt"]
    srt = (tmp_path / "openai" / "jfk.srt").read_text()
    assert "ask not what your country can do for you" in srt

    ours = ["--model", "base", "--output-format", "srt", "--output-dir", str(tmp_path / "ours")]
    ours += ["--word-timestamps", "True", "--beam-size", "5", "--verbose", "False"]
    assert cli.main([str(JFK), *ours]) == 0
    assert (tmp_path / "ours" / "jfk.srt").read_text() == srt


def test_command_line_model_dir_device_and_language(tmp_path, capsys):
    """--model_dir keeps the converted model there; --device takes PyTorch's names."""
    args = [str(JFK), "--model", "tiny.en", "--model_dir", str(tmp_path / "models"), "--device", "cpu"]
    args += ["--output_dir", str(tmp_path), "--output_format", "txt", "--language", "English", "--beam_size", "1"]
    assert cli.main(args) == 0
    assert any((tmp_path / "models" / "mlx").iterdir())
    assert "ask not what your country" in (tmp_path / "jfk.txt").read_text()
    assert cli.main([str(JFK), "--model", "tiny.en", "--device", "tpu", "--output_dir", str(tmp_path)]) == 1
    assert "device is 'cpu' or 'gpu', not 'tpu'" in capsys.readouterr().err
