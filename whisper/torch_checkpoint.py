"""Read openai-whisper's `.pt` checkpoints (`{"dims": ..., "model_state_dict": ...}`) without PyTorch.

`torch.save` writes a zip archive: `<root>/data.pkl` pickles the object, and each tensor's
storage is a persistent id `("storage", storage type, key, location, element count)` whose raw
little-endian bytes are `<root>/data/<key>`; a tensor is rebuilt from its storage, offset, size
and stride by `torch._utils._rebuild_tensor_v2`.  A pickle may name any Python callable, so this
reader's unpickler knows only the few names a tensor needs and refuses every other one.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .checkpoints import Checkpoint, ModelFormatError, checked, mlx_layout
from .model import ModelDimensions

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,  # widened to float32 below
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "BoolStorage": np.bool_,
}


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_) -> np.ndarray:
    # *_: requires_grad, backward hooks and metadata, which mean nothing to an array.
    if storage.dtype == np.uint16:
        storage = (storage.astype(np.uint32) << 16).view(np.float32)
    if len(size) != len(stride) or min(size, default=1) < 0 or min(stride, default=0) < 0 or offset < 0:
        raise ModelFormatError(f"a tensor of size {size} and stride {stride}: not a checkpoint's")
    last = offset + sum((n - 1) * step for n, step in zip(size, stride))
    if 0 not in size and last >= storage.size:
        # as_strided would read past the storage's end.
        raise ModelFormatError(f"a tensor of size {size} reaches past its storage of {storage.size} values")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[s * item for s in stride])
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_) -> np.ndarray:
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): name for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, root: str, path: Path):
        super().__init__(archive.open(f"{root}/data.pkl"))
        self.archive, self.root, self.path = archive, root, path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise ModelFormatError(
                f"{self.path}: the checkpoint names {module}.{name}, which a Whisper checkpoint does not "
                "need; it is not loaded, since a pickle can run any code it names"
            )
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid: tuple) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise ModelFormatError(f"{self.path}: unknown storage reference {pid!r}")
        _, storage_type, key, _location, count = pid
        dtype = np.dtype(_STORAGE_DTYPES[storage_type]).newbyteorder("<")
        data = self.archive.read(f"{self.root}/data/{key}")
        if len(data) < count * dtype.itemsize:
            raise ModelFormatError(f"{self.path}: storage {key} is truncated; download the checkpoint again")
        return np.frombuffer(data, dtype=dtype, count=count)


def read_torch_pickle(path: str | Path) -> object:
    """The object a `torch.save` zip archive holds, its tensors as numpy arrays."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ModelFormatError(
            f"{path}: not a PyTorch zip archive (a truncated download, or torch's legacy format: re-save it "
            "with a recent PyTorch, `torch.save(torch.load(path), path)`)"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ModelFormatError(f"{path}: a zip archive, but not one written by torch.save")
        root = pickles[0].split("/")[0]
        byteorder = f"{root}/byteorder"  # absent from archives older than the field: little-endian
        if byteorder in archive.namelist() and archive.read(byteorder).decode().strip() != "little":
            raise ModelFormatError(f"{path}: a big-endian checkpoint; re-save it on a little-endian machine")
        try:
            return _Unpickler(archive, root, path).load()
        except ModelFormatError:
            raise
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as error:
            raise ModelFormatError(f"{path}: the checkpoint cannot be read ({error})") from None


def _our_name(name: str) -> str:
    """openai-whisper's parameter names are ours, but for the MLP layers."""
    return name.replace(".mlp.0.", ".mlp1.").replace(".mlp.2.", ".mlp2.")


def load_openai_checkpoint(path: str | Path) -> Checkpoint:
    """Dimensions and weights (our names and layouts) of an openai-whisper `.pt` file."""
    content = read_torch_pickle(path)
    if not (
        isinstance(content, dict)
        and isinstance(content.get("dims"), dict)
        and isinstance(content.get("model_state_dict"), dict)
        and all(isinstance(value, np.ndarray) for value in content["model_state_dict"].values())
    ):
        raise ModelFormatError(
            f"{path}: a PyTorch file, but not an openai-whisper checkpoint (dims, and a model_state_dict of tensors)"
        )
    try:
        dims = ModelDimensions(**{name: int(value) for name, value in content["dims"].items()})
    except TypeError as error:
        raise ModelFormatError(f"{path}: the checkpoint's dims are not Whisper's ({error})") from None
    # The encoder's positions are fixed sinusoids, which the model computes itself.
    weights = {
        _our_name(name): mlx_layout(name, value)
        for name, value in content["model_state_dict"].items()
        if name != "encoder.positional_embedding"
    }
    return checked(Checkpoint(dims, weights), path)
