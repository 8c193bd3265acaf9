"""mlx-whisper's API: `transcribe(audio, path_or_hf_repo=...)` and `load_models.load_model`,
reading model folders in mlx-community's layout (mlx-examples' whisper/convert.py: config.json
with the dimensions, "model_type" and, when quantized, "quantization"; the weights, float16, with
the alignment heads among them, in weights.npz or weights.safetensors).  The folders are made
here from the bundled tiny.en."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten
from speech import REPO, SPEECH_DIR, model, offline_hub

import whisper
from whisper import models
from whisper.transcribe import kept_model

JFK = SPEECH_DIR / "jfk.flac"


def save_mlx_community_folder(folder: Path, weights: dict[str, mx.array], extra_config: dict, npz: bool) -> Path:
    """Write `weights` and tiny.en's dimensions as mlx-examples' convert.py does."""
    tiny = model("tiny.en")
    weights = {**weights, "alignment_heads": mx.array(tiny.alignment_heads)}
    folder.mkdir(parents=True)
    if npz:
        np.savez(folder / "weights.npz", **{k: np.array(v) for k, v in weights.items()})
    else:
        mx.save_safetensors(str(folder / "weights.safetensors"), weights)
    config = {**asdict(tiny.dims), "model_type": "whisper", **extra_config}
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    return folder


@pytest.fixture(scope="module")
def float16_folder(tmp_path_factory) -> Path:
    source = mx.load(str(models.prepare("tiny.en") / "weights.safetensors"))
    weights = {k: v.astype(mx.float16) for k, v in source.items()}
    return save_mlx_community_folder(tmp_path_factory.mktemp("mlx") / "whisper-tiny.en", weights, {}, npz=True)


def test_mlx_community_folder_loads_with_its_alignment_heads(float16_folder):
    loaded = whisper.load_models.load_model(str(float16_folder))
    tiny = model("tiny.en")
    assert loaded.dtype == mx.float32  # mlx-whisper's default
    assert loaded.alignment_heads == tiny.alignment_heads  # from the weights: config.json has none
    assert whisper.load_models.load_model(str(float16_folder), mx.float16).dtype == mx.float16


def test_transcribe_audio_first_keeps_the_model(float16_folder):
    """The float16 weights are the bundled ones (stored in float16 too): the same text."""
    ours = whisper.transcribe(model("tiny.en"), str(JFK), word_timestamps=True)
    kept_model.cache_clear()
    result = whisper.transcribe(str(JFK), path_or_hf_repo=str(float16_folder), word_timestamps=True, fp16=False)
    assert result["text"] == ours["text"]
    assert [w["start"] for s in result["segments"] for w in s["words"]] == [
        w["start"] for s in ours["segments"] for w in s["words"]
    ]
    # The next call naming the same model reuses it; the audio may be an MLX array, by keyword.
    audio = mx.array(whisper.load_audio(str(JFK)))
    again = whisper.transcribe(audio=audio, path_or_hf_repo=str(float16_folder), fp16=False)
    assert kept_model.cache_info().hits == 1
    assert again["text"] == ours["text"]


def test_transcribe_rejects_mixed_calls(float16_folder):
    with pytest.raises(TypeError, match="path_or_hf_repo"):
        whisper.transcribe(model("tiny.en"), str(JFK), path_or_hf_repo=str(float16_folder))
    with pytest.raises(TypeError, match="needs the audio"):
        whisper.transcribe(path_or_hf_repo=str(float16_folder))


def test_quantized_mlx_community_folder(tmp_path):
    """mlx-examples quantizes every linear layer and the token embedding (convert.py -q).  The
    folder loads to exactly the weights saved; quantized decoding itself is tested (slowly: MLX's
    quantized products are slow on Linux CPUs) in test_engine_batch.py."""
    quantized = whisper.load_model("tiny.en", dtype=mx.float16)
    nn.quantize(quantized, group_size=64, bits=8)
    weights = dict(tree_flatten(quantized.parameters()))
    folder = save_mlx_community_folder(
        tmp_path / "whisper-tiny.en-8bit", weights, {"quantization": {"group_size": 64, "bits": 8}}, npz=False
    )
    loaded = whisper.load_models.load_model(str(folder), mx.float16)
    layers = [m for m in loaded.modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert len(layers) == 1 + 4 * 6 + 4 * 10  # the embedding; 6 products an encoder layer, 10 a decoder layer
    assert all(layer.bits == 8 and layer.group_size == 64 for layer in layers)
    loaded_weights = dict(tree_flatten(loaded.parameters()))
    assert loaded_weights.keys() == weights.keys()
    assert all(mx.array_equal(loaded_weights[k], weights[k]).item() for k in weights)


MLX_README = """
import whisper as mlx_whisper

speech_file = {speech_file!r}

text = mlx_whisper.transcribe(speech_file)["text"]
print(text)

result = mlx_whisper.transcribe(speech_file, path_or_hf_repo="mlx-community/whisper-tiny.en-mlx")
print(result["text"])

output = mlx_whisper.transcribe(speech_file, word_timestamps=True)
print(output["segments"][0]["words"])
"""


def test_mlx_whisper_readme_examples(float16_folder, tmp_path):
    """mlx-whisper's README, its model names swapped for ours: the default model (base here),
    then a Hugging Face repo id read offline from the Hugging Face cache."""
    files = [float16_folder / "config.json", float16_folder / "weights.npz"]
    env = offline_hub(tmp_path / "hub", "mlx-community/whisper-tiny.en-mlx", files)
    script = MLX_README.format(speech_file=str(JFK))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    base_text, tiny_text, words = out.stdout.splitlines()
    ours = whisper.transcribe(model("base"), str(JFK), word_timestamps=True)
    assert base_text == ours["text"]
    assert tiny_text == whisper.transcribe(model("tiny.en"), str(JFK))["text"]
    assert words == str(ours["segments"][0]["words"])
