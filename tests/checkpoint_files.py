"""Small random-weight Whisper checkpoints, one per architecture family, written in every format
the engine reads: openai-whisper's `.pt` (without torch), a Hugging Face transformers folder and an
mlx-community folder (float16, or quantized).

The weights come from a fixed numpy seed, so the tests (in .venv, without torch) and
tests/reference/make_checkpoint_fixtures.py (in .venv-ref, with openai-whisper and transformers)
write the same files byte for byte.  Every value is a float16 number, so the float16 formats hold
the very weights the float32 ones do.  The vocabularies are the real ones, so that the tokenizer
of each family applies.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import numpy as np
from mlx.utils import tree_flatten

from whisper.model import ModelDimensions, Whisper, sinusoids
from whisper.transformers_checkpoint import transformers_name


def _family(n_mels: int, n_vocab: int, audio_layers: int, text_layers: int) -> ModelDimensions:
    return ModelDimensions(n_mels, 1500, 64, 2, audio_layers, n_vocab, 448, 64, 2, text_layers)


FAMILIES = {
    "multilingual-v2": _family(80, 51865, 2, 2),
    "english": _family(80, 51864, 2, 2),
    "v3": _family(128, 51866, 2, 4),
    "distil-v3": _family(128, 51866, 4, 1),
}


def seeded_weights(family: str) -> dict[str, np.ndarray]:
    return random_weights(FAMILIES[family], sorted(FAMILIES).index(family) + 1600)


def random_weights(dims: ModelDimensions, seed: int) -> dict[str, np.ndarray]:
    """Our parameters of a model of these dimensions (names and shapes from `whisper.model`),
    float16 values as float32: weights ~ N(0, 1/fan_in), layer norms near 1, biases small."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tree_flatten(Whisper(dims).parameters()):
        shape = tuple(value.shape)
        if name.endswith("bias"):
            array = 0.1 * rng.standard_normal(shape)
        elif "_ln" in name or name.endswith(("ln.weight", "ln_post.weight")):
            array = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "decoder.token_embedding.weight":
            array = 0.5 * rng.standard_normal(shape)
        elif name == "decoder.positional_embedding":
            array = 0.1 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            array = rng.standard_normal(shape) / np.sqrt(fan_in)
        weights[name] = array.astype(np.float16).astype(np.float32)
    return weights


# ------------------------------------------------------------------ openai-whisper's .pt


def openai_state_dict(dims: ModelDimensions, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """openai-whisper's state dict of our weights: `mlp.0`/`mlp.2`, torch's (out, in, kernel)
    convolutions, and the encoder's sinusoids, which it keeps among its buffers."""
    state = {"encoder.positional_embedding": sinusoids(dims.n_audio_ctx, dims.n_audio_state)}
    for name, value in weights.items():
        if name.startswith("encoder.conv") and value.ndim == 3:
            value = value.transpose(0, 2, 1)
        state[name.replace(".mlp1.", ".mlp.0.").replace(".mlp2.", ".mlp.2.")] = np.ascontiguousarray(value)
    return state


class _TorchName:
    """A global of torch's that the pickle names without torch being imported."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle reduces only to callables; this one is only ever named
        raise TypeError(f"{self.module}.{self.name} is torch's")


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _Tensor:
    def __init__(self, storage: _Storage):
        self.storage = storage

    def __reduce__(self):
        array = self.storage.array
        stride = tuple(s // array.itemsize for s in array.strides)
        rebuild = _TorchName("torch._utils", "_rebuild_tensor_v2")
        return rebuild, (self.storage, 0, array.shape, stride, False, OrderedDict())


_STORAGE_NAMES = {np.dtype(np.float16): "HalfStorage", np.dtype(np.float32): "FloatStorage"}


class _TorchPickler(pickle._Pickler):  # the Python pickler: its dispatch table takes new types
    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def _save_torch_name(self, obj: _TorchName) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_TorchName] = _save_torch_name

    def persistent_id(self, obj: object):
        if isinstance(obj, _Storage):
            storage_type = _TorchName("torch", _STORAGE_NAMES[obj.array.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.array.size)
        return None


def write_openai_pt(path: Path, dims: ModelDimensions, weights: dict[str, np.ndarray], dtype=np.float16) -> Path:
    """`torch.save({"dims": ..., "model_state_dict": ...})`'s zip archive, as openai-whisper's
    checkpoints are: data.pkl, one data/<key> file per tensor, version and byteorder."""
    # openai-whisper reads the encoder's positions from the file and we compute them: in float32
    # they are the same numbers.
    storages = [
        (name, _Storage(str(i), np.ascontiguousarray(value, dtype=np.float32 if "positional" in name else dtype)))
        for i, (name, value) in enumerate(openai_state_dict(dims, weights).items())
    ]
    content = {"dims": asdict(dims), "model_state_dict": OrderedDict((n, _Tensor(s)) for n, s in storages)}
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(content)
    root = path.stem
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{root}/data.pkl", buffer.getvalue())
        archive.writestr(f"{root}/byteorder", "little")
        for _, storage in storages:
            archive.writestr(f"{root}/data/{storage.key}", storage.array.tobytes())
        archive.writestr(f"{root}/version", "3\n")
    return path


# ------------------------------------------------------------ Hugging Face transformers


def transformers_config(dims: ModelDimensions) -> dict:
    """transformers' WhisperConfig of these dimensions, as config.json holds it."""
    eot = 50257 if dims.n_vocab >= 51865 else 50256
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "num_mel_bins": dims.n_mels,
        "max_source_positions": dims.n_audio_ctx,
        "d_model": dims.n_audio_state,
        "encoder_attention_heads": dims.n_audio_head,
        "encoder_layers": dims.n_audio_layer,
        "encoder_ffn_dim": 4 * dims.n_audio_state,
        "vocab_size": dims.n_vocab,
        "max_target_positions": dims.n_text_ctx,
        "decoder_attention_heads": dims.n_text_head,
        "decoder_layers": dims.n_text_layer,
        "decoder_ffn_dim": 4 * dims.n_text_state,
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": eot + 1,  # <|startoftranscript|>
        "torch_dtype": "float16",
    }


def write_transformers_folder(folder: Path, dims: ModelDimensions, weights: dict[str, np.ndarray]) -> Path:
    """model.safetensors (float16) and config.json, as `save_pretrained` writes them."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"model.encoder.embed_positions.weight": sinusoids(dims.n_audio_ctx, dims.n_audio_state)}
    for name, value in weights.items():
        if name.startswith("encoder.conv") and value.ndim == 3:
            value = value.transpose(0, 2, 1)
        tensors[transformers_name(name)] = value
    save_file(  # the encoder's positions in float32, as in `write_openai_pt`
        {
            name: np.ascontiguousarray(value, dtype=np.float32 if "embed_positions" in name else np.float16)
            for name, value in tensors.items()
        },
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(json.dumps(transformers_config(dims), indent=1))
    return folder


# ---------------------------------------------------------------------- mlx-community


def write_mlx_community_folder(
    folder: Path, dims: ModelDimensions, weights: dict[str, np.ndarray], *, bits: int | None = None
) -> Path:
    """mlx-whisper's layout: config.json with openai-whisper's dimension names, and
    weights.safetensors in float16 under mlx-examples' names (ours), quantized with `bits`."""
    import mlx.core as mx
    from mlx import nn

    folder.mkdir(parents=True, exist_ok=True)
    config = {**asdict(dims), "model_type": "whisper"}
    model = Whisper(dims)
    model.load_weights([(name, mx.array(value)) for name, value in weights.items()])
    model.set_dtype(mx.float16)
    if bits is not None:
        nn.quantize(model, group_size=64, bits=bits)
        config["quantization"] = {"group_size": 64, "bits": bits}
    mx.save_safetensors(str(folder / "weights.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder
