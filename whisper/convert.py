"""Read a CTranslate2 (faster-whisper) Whisper model and turn it into our weights.

The CT2 `model.bin` layout (little-endian): uint32 binary version; the spec name and
revision; the variables, each as name, rank, dims, dtype id, byte count and raw bytes;
then aliases (name -> target).  Strings are uint16-length-prefixed and NUL-terminated.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .checkpoints import Checkpoint, ModelFormatError, checked
from .model import ModelDimensions

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BF16 = 5
_SUPPORTED_VERSIONS = (5, 6)


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelFormatError("model.bin ends early: the file is truncated; reinstall the model package")
    return struct.unpack("<" + fmt, data)


def _read_string(f: BinaryIO) -> str:
    (length,) = _read(f, "H")
    raw = f.read(length)
    if len(raw) != length:
        raise ModelFormatError("model.bin ends early: the file is truncated; reinstall the model package")
    return raw.rstrip(b"\0").decode("utf-8")


def read_ct2_variables(path: str | Path) -> dict[str, np.ndarray]:
    """Every variable of a CT2 model.bin, aliases resolved, as numpy arrays."""
    path = Path(path)
    variables: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        (version,) = _read(f, "I")
        if version not in _SUPPORTED_VERSIONS:
            raise ModelFormatError(f"{path}: unsupported CTranslate2 binary version {version}")
        spec = _read_string(f)
        if spec != "WhisperSpec":
            raise ModelFormatError(f"{path}: holds a {spec or 'unnamed'} model, not Whisper")
        _read(f, "I")  # spec revision
        (count,) = _read(f, "I")
        for _ in range(count):
            name = _read_string(f)
            (rank,) = _read(f, "B")
            shape = _read(f, f"{rank}I") if rank else ()
            dtype_id, nbytes = _read(f, "BI")
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ModelFormatError(f"{path}: truncated inside variable {name!r}; reinstall the model package")
            if dtype_id == _BF16:
                bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                array = bits.view(np.float32)
            elif dtype_id in _CT2_DTYPES:
                array = np.frombuffer(raw, dtype=_CT2_DTYPES[dtype_id])
            else:
                raise ModelFormatError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
            variables[name] = array.reshape(shape)
        (alias_count,) = _read(f, "I")
        for _ in range(alias_count):
            alias, target = _read_string(f), _read_string(f)
            variables[alias] = variables[target]
        if f.read(1):
            raise ModelFormatError(f"{path}: unexpected bytes after the last alias; the file is damaged")
    return variables


def _layer_count(variables: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for name in variables if (m := pattern.match(name)))


def _scalar(variables: dict[str, np.ndarray], name: str, default: int) -> int:
    return int(variables[name]) if name in variables else default


def dims_from_variables(variables: dict[str, np.ndarray]) -> ModelDimensions:
    conv1 = variables["encoder/conv1/weight"]
    embeddings = variables["decoder/embeddings/weight"]
    n_audio_state = conv1.shape[0]
    n_text_state = embeddings.shape[1]
    return ModelDimensions(
        n_mels=conv1.shape[1],
        n_audio_ctx=1500,
        n_audio_state=n_audio_state,
        n_audio_head=_scalar(variables, "encoder/num_heads", n_audio_state // 64),
        n_audio_layer=_layer_count(variables, "encoder"),
        n_vocab=embeddings.shape[0],
        n_text_ctx=variables["decoder/position_encodings/encodings"].shape[0],
        n_text_state=n_text_state,
        n_text_head=_scalar(variables, "decoder/num_heads", n_text_state // 64),
        n_text_layer=_layer_count(variables, "decoder"),
    )


def _linear(out: dict, name: str, variables: dict, prefix: str, used: set, key_has_bias: bool = True) -> None:
    out[f"{name}.weight"] = variables[f"{prefix}/weight"]
    used.add(f"{prefix}/weight")
    if key_has_bias:
        out[f"{name}.bias"] = variables[f"{prefix}/bias"]
        used.add(f"{prefix}/bias")


def _norm(out: dict, name: str, variables: dict, prefix: str, used: set) -> None:
    out[f"{name}.weight"] = variables[f"{prefix}/gamma"]
    out[f"{name}.bias"] = variables[f"{prefix}/beta"]
    used.update({f"{prefix}/gamma", f"{prefix}/beta"})


def _split_rows(variables: dict, prefix: str, parts: int, used: set) -> list[tuple[np.ndarray, np.ndarray]]:
    weight, bias = variables[f"{prefix}/weight"], variables[f"{prefix}/bias"]
    used.update({f"{prefix}/weight", f"{prefix}/bias"})
    if weight.shape[0] % parts:
        raise ModelFormatError(f"{prefix}: {weight.shape[0]} rows cannot be split in {parts}")
    return list(zip(np.split(weight, parts), np.split(bias, parts)))


def _attention(out: dict, name: str, qkv: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Whisper's key projection has no bias; CT2 stores a zero slice in its place."""
    for proj, (weight, bias) in zip(("query", "key", "value"), qkv):
        out[f"{name}.{proj}.weight"] = weight
        if proj == "key":
            if np.any(bias):
                raise ModelFormatError(f"{name}: the key projection has a non-zero bias")
        else:
            out[f"{name}.{proj}.bias"] = bias


def _block(out: dict, name: str, variables: dict, prefix: str, used: set, cross: bool) -> None:
    _attention(out, f"{name}.attn", _split_rows(variables, f"{prefix}/self_attention/linear_0", 3, used))
    _linear(out, f"{name}.attn.out", variables, f"{prefix}/self_attention/linear_1", used)
    _norm(out, f"{name}.attn_ln", variables, f"{prefix}/self_attention/layer_norm", used)
    if cross:
        query = variables[f"{prefix}/attention/linear_0/weight"], variables[f"{prefix}/attention/linear_0/bias"]
        used.update({f"{prefix}/attention/linear_0/weight", f"{prefix}/attention/linear_0/bias"})
        key, value = _split_rows(variables, f"{prefix}/attention/linear_1", 2, used)
        _attention(out, f"{name}.cross_attn", [query, key, value])
        _linear(out, f"{name}.cross_attn.out", variables, f"{prefix}/attention/linear_2", used)
        _norm(out, f"{name}.cross_attn_ln", variables, f"{prefix}/attention/layer_norm", used)
    _linear(out, f"{name}.mlp1", variables, f"{prefix}/ffn/linear_0", used)
    _linear(out, f"{name}.mlp2", variables, f"{prefix}/ffn/linear_1", used)
    _norm(out, f"{name}.mlp_ln", variables, f"{prefix}/ffn/layer_norm", used)


# Flags of the CT2 spec and the value Whisper's architecture needs.
_WHISPER_FLAGS = {
    "decoder/activation": 3,  # exact (erf) GELU
    "decoder/pre_norm": 1,
    "decoder/alibi": 0,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}


def _check_flags(variables: dict[str, np.ndarray]) -> None:
    for name, expected in _WHISPER_FLAGS.items():
        if name in variables and int(variables[name]) != expected:
            raise ModelFormatError(f"{name} is {int(variables[name])}; Whisper needs {expected}")


def convert_ct2_variables(variables: dict[str, np.ndarray]) -> tuple[ModelDimensions, dict[str, np.ndarray]]:
    """Map CT2 names to ours (openai-whisper's, with `mlp1`/`mlp2`), in float32.

    Every tensor of the file must be used: an unused one means a layout we do not
    understand, and silently dropping weights would give wrong text.
    """
    try:
        dims = dims_from_variables(variables)
    except KeyError as missing:
        raise ModelFormatError(f"not a Whisper model: variable {missing} is missing") from None
    _check_flags(variables)
    used: set[str] = {"encoder/position_encodings/encodings", "decoder/projection/weight"}
    used.update(name for name, value in variables.items() if value.ndim == 0)
    out: dict[str, np.ndarray] = {}
    try:
        for conv in ("conv1", "conv2"):
            # CT2 stores (out, in, kernel); MLX's Conv1d wants (out, kernel, in).
            out[f"encoder.{conv}.weight"] = variables[f"encoder/{conv}/weight"].transpose(0, 2, 1)
            out[f"encoder.{conv}.bias"] = variables[f"encoder/{conv}/bias"]
            used.update({f"encoder/{conv}/weight", f"encoder/{conv}/bias"})
        for i in range(dims.n_audio_layer):
            _block(out, f"encoder.blocks.{i}", variables, f"encoder/layer_{i}", used, cross=False)
        _norm(out, "encoder.ln_post", variables, "encoder/layer_norm", used)
        out["decoder.token_embedding.weight"] = variables["decoder/embeddings/weight"]
        out["decoder.positional_embedding"] = variables["decoder/position_encodings/encodings"]
        used.update({"decoder/embeddings/weight", "decoder/position_encodings/encodings"})
        for i in range(dims.n_text_layer):
            _block(out, f"decoder.blocks.{i}", variables, f"decoder/layer_{i}", used, cross=True)
        _norm(out, "decoder.ln", variables, "decoder/layer_norm", used)
    except KeyError as missing:
        raise ModelFormatError(f"not a complete Whisper model: variable {missing} is missing") from None
    unused = sorted(set(variables) - used)
    if unused:
        raise ModelFormatError(f"the model has tensors this converter does not know: {unused[:5]}")
    return dims, checked(Checkpoint(dims, out), "model.bin").weights


def alignment_heads_from_config(config_path: Path) -> list[list[int]] | None:
    if not config_path.exists():
        return None
    heads = json.loads(config_path.read_text()).get("alignment_heads")
    return [list(map(int, pair)) for pair in heads] if heads else None


def load_ct2(model_dir: str | Path) -> tuple[ModelDimensions, dict[str, np.ndarray]]:
    """Dimensions and float32 weights (our names) of a CT2 Whisper folder."""
    model_dir = Path(model_dir)
    return convert_ct2_variables(read_ct2_variables(model_dir / "model.bin"))
