"""Every architecture family in every checkpoint format, against openai-whisper and transformers
run on the same weights: log-mel within 1e-4, first-step logits within 1e-3, greedy tokens
identical on three windows.

The checkpoints are small random-weight models written here by tests/checkpoint_files.py; the
reference side was computed on the very same files by tests/reference/make_checkpoint_fixtures.py
(see its docstring), in .venv-ref, and committed in tests/fixtures/.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import numpy as np
import pytest
from checkpoint_files import (
    FAMILIES,
    TorchStorage,
    TorchTensor,
    seeded_weights,
    write_ct2_folder,
    write_mlx_community_folder,
    write_openai_pt,
    write_torch_zip,
    write_transformers_folder,
)
from fake_hub import FakeHub, hub_at
from mlx import nn
from speech import REPO, SPEECH_DIR, offline_hub
from tqdm.auto import tqdm

import whisper
from whisper import models
from whisper.audio import N_FRAMES, N_SAMPLES, load_audio, mel_filters
from whisper.catalog import KNOWN_MODELS
from whisper.checkpoints import ModelFormatError
from whisper.model import Whisper
from whisper.tokenizer import get_tokenizer
from whisper.torch_checkpoint import load_openai_checkpoint
from whisper.transformers_checkpoint import load_transformers_folder

FIXTURES = REPO / "tests" / "fixtures"
REFERENCE = json.loads((FIXTURES / "checkpoint_reference.json").read_text())
MEL_TOLERANCE = 1e-4
LOGITS_TOLERANCE = 1e-3
WRITERS = {
    "openai-pt": lambda path, dims, weights: write_openai_pt(path.with_suffix(".pt"), dims, weights),
    "transformers": write_transformers_folder,
    "mlx-community-fp16": write_mlx_community_folder,
    "mlx-community-npz": functools.partial(write_mlx_community_folder, weights_file="weights.npz"),
    "ctranslate2": write_ct2_folder,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@functools.cache
def _written(root: Path, family: str, fmt: str) -> Path:
    return WRITERS[fmt](root / f"{family}-{fmt}", FAMILIES[family], seeded_weights(family))


@functools.cache
def _window(clip: str, n_mels: int) -> mx.array:
    """The first 30-s window's log-mel, (n_mels, frames), as transcribe makes it."""
    audio = np.concatenate([load_audio(SPEECH_DIR / clip), np.zeros(N_SAMPLES, np.float32)])
    return whisper.log_mel_spectrogram(audio, n_mels)[:, :N_FRAMES]


def _reference(family: str) -> np.lib.npyio.NpzFile:
    return np.load(FIXTURES / f"checkpoint_{family}.npz")


@pytest.mark.parametrize("family", ["multilingual-v2", "v3"])
def test_log_mel_matches_openai(family):
    reference = _reference(family)
    assert np.abs(mel_filters(FAMILIES[family].n_mels) - reference["mel_filters"]).max() < 1e-8
    ours = np.array(_window(REFERENCE["clips"][0], FAMILIES[family].n_mels)).T[reference["mel_frames"]]
    assert np.abs(ours - reference["mel_rows"]).max() < MEL_TOLERANCE


def _check_against_reference(model: Whisper, family: str, fmt: str) -> None:
    reference = _reference(family)
    windows = REFERENCE["families"][family]["windows"]
    for i, window in enumerate(windows):
        mel = _window(window["clip"], model.dims.n_mels)
        features = model.embed_audio(mel.T[None])
        head = reference["features_head"][i]
        assert np.abs(np.array(features[0, : head.shape[0]]) - head).max() < LOGITS_TOLERANCE
        logits = np.array(model.logits(mx.array(reference["initial_tokens"][None]), features)[0, -1])
        ids = reference["logit_ids"][i]
        kept = ids >= 0
        assert np.abs(logits[ids[kept]] - reference["logits_openai"][i][kept]).max() < LOGITS_TOLERANCE
        if fmt == "transformers":
            assert np.abs(logits[ids[kept]] - reference["logits_transformers"][i][kept]).max() < LOGITS_TOLERANCE
        options = whisper.DecodingOptions(language=None if model.is_multilingual else "en", temperature=0.0, fp16=False)
        result = whisper.decode(model, mel, options)
        expected = reference["tokens"][i]
        assert result.language == window["language"]
        assert result.tokens == expected[expected >= 0].tolist(), f"{window['clip']}: greedy tokens differ"


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoint_matches_openai_whisper(workspace, family, fmt):
    source = _written(workspace, family, fmt)
    model = whisper.load_model(str(source), "cpu", download_root=workspace / "cache")
    assert model.dims == FAMILIES[family]
    assert model.num_languages == {51864: 99, 51865: 99, 51866: 100}[model.dims.n_vocab]
    _check_against_reference(model, family, fmt)


def test_conversion_is_cached_once(workspace):
    """A .pt is converted on its first load only: the second finds the cache entry by its sha256."""
    source = _written(workspace, "english", "openai-pt")
    root = workspace / "cache-once"
    first = models.prepare(str(source), root)
    stamp = (first / "weights.safetensors").stat().st_mtime_ns
    assert models.prepare(str(source), root) == first
    assert (first / "weights.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((first / "config.json").read_text())["source_sha256"] == models.file_sha256(source)


def test_quantized_mlx_community_folder(workspace):
    """8-bit weights load as quantized layers and stay close to the float model's logits."""
    family = "v3"
    source = write_mlx_community_folder(workspace / "v3-q8", FAMILIES[family], seeded_weights(family), bits=8)
    model = whisper.load_model(str(source), "cpu")
    assert any(isinstance(m, nn.QuantizedLinear) for m in model.modules())
    reference = _reference(family)
    features = model.embed_audio(_window(REFERENCE["clips"][0], 128).T[None])
    logits = np.array(model.logits(mx.array(reference["initial_tokens"][None]), features)[0, -1])
    ids = reference["logit_ids"][0]
    expected = reference["logits_openai"][0][ids >= 0]
    error = logits[ids[ids >= 0]] - expected
    assert np.sqrt(np.mean(error**2)) < 0.05 * np.std(expected)


def _torch_zip(path: Path, pickled: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")
    return path


def test_pt_reader_refuses_what_a_checkpoint_does_not_need(tmp_path):
    # A pickle that would call os.system when loaded by a trusting unpickler.
    with pytest.raises(ModelFormatError, match=r"names posix\.system.*not loaded"):
        load_openai_checkpoint(_torch_zip(tmp_path / "evil.pt", pickle.dumps(os.system)))
    with pytest.raises(ModelFormatError, match="not an openai-whisper checkpoint"):
        load_openai_checkpoint(_torch_zip(tmp_path / "other.pt", pickle.dumps({"weights": 1})))
    # A tensor that claims more values than its storage holds.
    source = _written(tmp_path, "english", "openai-pt")
    with zipfile.ZipFile(source) as archive:
        names = [name for name in archive.namelist() if "/data/" in name]
        files = {name: archive.read(name) for name in archive.namelist()}
    files[names[0]] = files[names[0]][:8]
    with zipfile.ZipFile(tmp_path / "short.pt", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    with pytest.raises(ModelFormatError, match="truncated"):
        load_openai_checkpoint(tmp_path / "short.pt")
    # A tensor that claims more values than its storage holds.
    storage = TorchStorage("0", np.zeros(4, np.float32))
    content = {"dims": {}, "model_state_dict": {"x": TorchTensor(storage, shape=(2, 3))}}
    with pytest.raises(ModelFormatError, match="reaches past its storage"):
        load_openai_checkpoint(write_torch_zip(tmp_path / "long.pt", content, [storage]))
    (tmp_path / "old.pt").write_bytes(b"\x80\x02legacy")
    with pytest.raises(ModelFormatError, match="not a PyTorch zip archive"):
        load_openai_checkpoint(tmp_path / "old.pt")


def test_transformers_folder_of_another_architecture_is_refused(workspace, tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    source = _written(workspace, "english", "transformers")
    os.symlink(source / "model.safetensors", folder / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "encoder_ffn_dim": 100}))
    with pytest.raises(ModelFormatError, match="does not run"):
        whisper.load_model(str(folder), "cpu", download_root=tmp_path / "cache")


def test_sharded_transformers_folder(workspace, tmp_path):
    """Shards listed by model.safetensors.index.json load as one model.safetensors does; other
    safetensors files beside them (a repo's float32 copies) are not read."""
    from safetensors.numpy import load_file, save_file

    source = _written(workspace, "english", "transformers")
    tensors = load_file(str(source / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        save_file({name: tensors[name] for name in members}, str(tmp_path / shard))
    weight_map = {name: shard for shard, members in shards.items() for name in members}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "model.fp32-00001-of-00001.safetensors").write_bytes(b"not read")
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    whole, sharded = load_transformers_folder(source), load_transformers_folder(tmp_path)
    assert sharded.dims == whole.dims and sorted(sharded.weights) == sorted(whole.weights)
    assert all(np.array_equal(sharded.weights[name], value) for name, value in whole.weights.items())


def test_alignment_heads_of_every_name():
    """openai-whisper's table for its names; the last half of the decoder layers, every head, for
    the rest (distil-whisper's), unless the checkpoint names its own."""
    assert sorted(REFERENCE["alignment_heads"]) == sorted(n for n in KNOWN_MODELS if not n.startswith("distil"))
    for name, known in KNOWN_MODELS.items():
        expected = REFERENCE["alignment_heads"].get(name)
        assert known.alignment_heads == expected, name
        if expected is None:
            layers, heads = known.dims.n_text_layer, known.dims.n_text_head
            default = Whisper(known.dims).alignment_heads
            assert default == [[layer, head] for layer in range(layers // 2, layers) for head in range(heads)]


def test_v3_tokenizer_has_cantonese():
    tokenizer = get_tokenizer(True, num_languages=100, language="yue")
    assert tokenizer.to_language_token("yue") == 50358 and len(tokenizer.all_language_codes) == 100
    assert tokenizer.sot_sequence == (50258, 50358, 50360)
    assert get_tokenizer(True, num_languages=99).encoding.n_vocab == 51865


def test_every_name_is_offered():
    names = whisper.available_models()
    assert names[:2] == ["tiny.en", "base"]
    for name in ("tiny", "small", "medium.en", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo"):
        assert name in names
    assert {"distil-large-v3", "distil-small.en"} <= set(names)
    assert KNOWN_MODELS["turbo"].dims.n_text_layer == 4 and KNOWN_MODELS["turbo"].dims.n_mels == 128


def test_catalog_name_from_the_hugging_face_cache_then_from_ours(workspace, tmp_path):
    """A name resolves to its repo (here served offline from a local hub cache, in transformers'
    layout), is converted once, and then loads from our cache with no hub at all, on the command
    line too."""
    source = _written(workspace, "distil-v3", "transformers")
    files = [source / "model.safetensors", source / "config.json"]
    env = offline_hub(tmp_path / "hub", KNOWN_MODELS["distil-large-v3"].repo, files)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    script = (
        "import whisper, whisper.models as m; model = whisper.load_model('distil-large-v3', 'cpu');"
        "print(model.dims.n_text_layer, m.local_models())"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 ") and "'distil-large-v3'" in out.stdout
    env["HF_HUB_CACHE"] = str(tmp_path / "no-hub")
    command = [sys.executable, "-m", "whisper", str(SPEECH_DIR / "jfk.flac"), "--model", "distil-large-v3"]
    options = ["--device", "cpu", "--beam-size", "None", "--temperature-increment-on-fallback", "None"]
    output = ["--output-format", "txt", "--output-dir", str(tmp_path / "out")]
    out = subprocess.run(command + options + output, cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "jfk.txt").exists()


class _RecordedBar(tqdm):
    """A bar that keeps, at each update, its count and total; `made` holds every one made."""

    made: ClassVar[list[_RecordedBar]] = []

    def __init__(self, *args, **kwargs) -> None:
        kwargs.pop("name", None)  # huggingface_hub 1.x names its bars; tqdm refuses the keyword
        super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
        self.steps: list[tuple[float, float]] = []
        self.made.append(self)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self.steps.append((self.n, self.total))
        return shown


def test_repo_downloaded_through_the_hub_counts_its_bytes_with_the_bars_given(workspace, tmp_path):
    """A repo id not on this machine is fetched by huggingface_hub's own snapshot_download, from a
    stand-in for the Hub on this machine, with bars of the class `prepare` is given: the bytes
    (over 7 MB) count up in steps to the files' total size, and both files are counted; then the
    model is converted and decodes as its reference says."""
    source = _written(workspace, "english", "transformers")
    files = {name: source / name for name in ("config.json", "model.safetensors")}
    root = tmp_path / "cache"
    _RecordedBar.made.clear()
    with FakeHub({"menny-test/whisper-english": files}) as hub, hub_at(hub.url, root / "huggingface"):
        assert models.needs_download("menny-test/whisper-english", root)
        folder = models.prepare("menny-test/whisper-english", root, download_progress=_RecordedBar)
    assert not models.needs_download("menny-test/whisper-english", root)
    size = sum(path.stat().st_size for path in files.values())
    byte_bars = [bar for bar in _RecordedBar.made if bar.unit == "B"]
    assert byte_bars, "huggingface_hub counted no bytes"
    for bar in byte_bars:
        assert bar.steps[-1] == (size, size)
        assert len({done for done, _ in bar.steps if 0 < done < size}) >= 5, bar.steps
    [files_bar] = [bar for bar in _RecordedBar.made if bar.unit != "B"]
    assert (files_bar.n, files_bar.total) == (2, 2)
    assert json.loads((folder / "config.json").read_text())["source_repo"] == "menny-test/whisper-english"
    model = whisper.load_model("menny-test/whisper-english", "cpu", download_root=root)
    _check_against_reference(model, "english", "transformers")
