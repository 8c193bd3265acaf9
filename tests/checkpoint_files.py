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
import struct
import zipfile
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import numpy as np
from mlx.utils import tree_flatten

from whisper.model import ModelDimensions, Whisper, sinusoids
from whisper.tokenizer import Tokenizer, get_tokenizer
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


class TorchStorage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class TorchTensor:
    """A tensor of a whole storage, of the storage's shape unless `shape` claims another."""

    def __init__(self, storage: TorchStorage, shape: tuple[int, ...] | None = None):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        array = self.storage.array
        shape = self.shape or array.shape
        stride = tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
        rebuild = _TorchName("torch._utils", "_rebuild_tensor_v2")
        return rebuild, (self.storage, 0, shape, stride, False, OrderedDict())


_STORAGE_NAMES = {np.dtype(np.float16): "HalfStorage", np.dtype(np.float32): "FloatStorage"}


class _TorchPickler(pickle._Pickler):  # the Python pickler: its dispatch table takes new types
    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def _save_torch_name(self, obj: _TorchName) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_TorchName] = _save_torch_name

    def persistent_id(self, obj: object):
        if isinstance(obj, TorchStorage):
            storage_type = _TorchName("torch", _STORAGE_NAMES[obj.array.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.array.size)
        return None


def write_openai_pt(path: Path, dims: ModelDimensions, weights: dict[str, np.ndarray], dtype=np.float16) -> Path:
    """`torch.save({"dims": ..., "model_state_dict": ...})`'s zip archive, as openai-whisper's
    checkpoints are: data.pkl, one data/<key> file per tensor, version and byteorder."""
    # openai-whisper reads the encoder's positions from the file and we compute them: in float32
    # they are the same numbers.
    storages = [
        (name, TorchStorage(str(i), np.ascontiguousarray(value, dtype=np.float32 if "positional" in name else dtype)))
        for i, (name, value) in enumerate(openai_state_dict(dims, weights).items())
    ]
    state = OrderedDict((name, TorchTensor(storage)) for name, storage in storages)
    # What torch's state_dict() carries along: each module's version, pickled as the dict's state.
    state._metadata = OrderedDict((module, {"version": 1}) for module in ("", "encoder", "decoder"))
    content = {"dims": asdict(dims), "model_state_dict": state}
    return write_torch_zip(path, content, [storage for _, storage in storages])


def write_torch_zip(path: Path, content: object, storages: list[TorchStorage]) -> Path:
    """`torch.save`'s archive of `content`, whose TorchTensors keep their values in `storages`."""
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(content)
    root = path.stem
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{root}/data.pkl", buffer.getvalue())
        archive.writestr(f"{root}/byteorder", "little")
        for storage in storages:
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
    folder: Path,
    dims: ModelDimensions,
    weights: dict[str, np.ndarray],
    *,
    bits: int | None = None,
    weights_file: str = "weights.safetensors",
) -> Path:
    """mlx-whisper's layout: config.json with openai-whisper's dimension names, and the weights
    (weights.safetensors, or weights.npz as older conversions have it) in float16 under
    mlx-examples' names (ours), quantized with `bits`."""
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
    arrays, path = dict(tree_flatten(model.parameters())), str(folder / weights_file)
    if weights_file.endswith(".npz"):
        mx.savez(path, **arrays)
    else:
        mx.save_safetensors(path, arrays)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


# ------------------------------------------------------------------------- CTranslate2


def tokenizer_of(n_vocab: int, language: str | None = None) -> Tokenizer:
    """The tokenizer of a vocabulary of n_vocab tokens (English-only, 99 or 100 languages)."""
    multilingual = n_vocab >= 51865
    return get_tokenizer(multilingual, num_languages=n_vocab - 51765 - int(multilingual), language=language)


def _byte_names() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as its vocabulary files spell tokens: printable
    Latin-1 bytes stand for themselves, the others for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def vocabulary_names(n_vocab: int) -> list[str]:
    """Every token's name as CTranslate2's vocabulary files hold it: it finds the special tokens
    by name, and it reads the others too (with numbers for names, it took a multilingual model
    for an English one)."""
    tokenizer = tokenizer_of(n_vocab)
    names = _byte_names()
    ordinary = [
        "".join(names[b] for b in tokenizer.encoding.decode_single_token_bytes(i)) for i in range(tokenizer.eot)
    ]
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    return ordinary + [name for name, _ in specials]


_CT2_DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _ct2_variables(dims: ModelDimensions, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2's WhisperSpec variables of our weights: fused attention projections (a zero
    bias where Whisper's key has none), (out, in, kernel) convolutions, gamma/beta norms."""
    half = {name: value.astype(np.float16) for name, value in weights.items()}
    out = {
        "encoder/num_heads": np.array(dims.n_audio_head, np.int16),
        "decoder/num_heads": np.array(dims.n_text_head, np.int16),
        "decoder/activation": np.array(3, np.int8),
        "decoder/pre_norm": np.array(1, np.int8),
        "decoder/alibi": np.array(0, np.int8),
        "decoder/scale_embeddings": np.array(0, np.int8),
        "decoder/start_from_zero_embedding": np.array(0, np.int8),
        "decoder/alignment_layer": np.array(-1, np.int16),
        "decoder/alignment_heads": np.array(1, np.int16),
        "encoder/position_encodings/encodings": sinusoids(dims.n_audio_ctx, dims.n_audio_state),
        "decoder/embeddings/weight": half["decoder.token_embedding.weight"],
        "decoder/position_encodings/encodings": half["decoder.positional_embedding"],
    }
    for conv in ("conv1", "conv2"):
        out[f"encoder/{conv}/weight"] = np.ascontiguousarray(half[f"encoder.{conv}.weight"].transpose(0, 2, 1))
        out[f"encoder/{conv}/bias"] = half[f"encoder.{conv}.bias"]

    def norm(prefix: str, name: str) -> None:
        out[f"{prefix}/gamma"], out[f"{prefix}/beta"] = half[f"{name}.weight"], half[f"{name}.bias"]

    def linear(prefix: str, names: list[str]) -> None:
        out[f"{prefix}/weight"] = np.concatenate([half[f"{name}.weight"] for name in names])
        biases = [half.get(f"{name}.bias", np.zeros(half[f"{name}.weight"].shape[0], np.float16)) for name in names]
        out[f"{prefix}/bias"] = np.concatenate(biases)

    for stack, layers in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(layers):
            ours, theirs = f"{stack}.blocks.{i}", f"{stack}/layer_{i}"
            linear(f"{theirs}/self_attention/linear_0", [f"{ours}.attn.{p}" for p in ("query", "key", "value")])
            linear(f"{theirs}/self_attention/linear_1", [f"{ours}.attn.out"])
            norm(f"{theirs}/self_attention/layer_norm", f"{ours}.attn_ln")
            if stack == "decoder":
                linear(f"{theirs}/attention/linear_0", [f"{ours}.cross_attn.query"])
                linear(f"{theirs}/attention/linear_1", [f"{ours}.cross_attn.{p}" for p in ("key", "value")])
                linear(f"{theirs}/attention/linear_2", [f"{ours}.cross_attn.out"])
                norm(f"{theirs}/attention/layer_norm", f"{ours}.cross_attn_ln")
            linear(f"{theirs}/ffn/linear_0", [f"{ours}.mlp1"])
            linear(f"{theirs}/ffn/linear_1", [f"{ours}.mlp2"])
            norm(f"{theirs}/ffn/layer_norm", f"{ours}.mlp_ln")
    norm("encoder/layer_norm", "encoder.ln_post")
    norm("decoder/layer_norm", "decoder.ln")
    return out


def write_ct2_folder(folder: Path, dims: ModelDimensions, weights: dict[str, np.ndarray]) -> Path:
    """model.bin (CTranslate2's binary version 6, float16 weights, the output projection an alias
    of the token embedding), config.json and vocabulary.json, as faster-whisper's models hold."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.bin", "wb") as f:
        f.write(struct.pack("<I", 6) + _ct2_string("WhisperSpec") + struct.pack("<I", 3))
        variables = _ct2_variables(dims, weights)
        f.write(struct.pack("<I", len(variables)))
        for name, value in sorted(variables.items()):
            value = np.asarray(value)  # tobytes() is C order; ascontiguousarray would make scalars 1-d
            f.write(_ct2_string(name) + struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape))
            f.write(struct.pack("<BI", _CT2_DTYPE_IDS[value.dtype], value.nbytes) + value.tobytes())
        f.write(
            struct.pack("<I", 1) + _ct2_string("decoder/projection/weight") + _ct2_string("decoder/embeddings/weight")
        )
    tokenizer = tokenizer_of(dims.n_vocab)
    layers, heads = dims.n_text_layer, dims.n_text_head
    config = {
        "alignment_heads": [[layer, head] for layer in range(layers // 2, layers) for head in range(heads)],
        "lang_ids": list(tokenizer.all_language_tokens) if dims.n_vocab >= 51865 else [],
        "suppress_ids": [],
        "suppress_ids_begin": [220, tokenizer.eot],
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocabulary.json").write_text(json.dumps(vocabulary_names(dims.n_vocab)))
    return folder
