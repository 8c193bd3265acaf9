"""Read Hugging Face transformers' Whisper folders: config.json, model.safetensors (or its shards
`model-0000i-of-0000n.safetensors`), and generation_config.json's alignment heads if present.

Their parameter names differ from ours (openai-whisper's) part by part; `PART_NAMES` maps them,
in both directions, so that a folder can be written as well as read (the tests and benchmarks
write one for transformers and CTranslate2 to load).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoints import Checkpoint, ModelFormatError, checked, mlx_layout
from .model import ModelDimensions

# transformers' name of a part -> ours
PART_NAMES = {
    "layers": "blocks",
    "self_attn": "attn",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn": "cross_attn",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "q_proj": "query",
    "k_proj": "key",
    "v_proj": "value",
    "out_proj": "out",
    "fc1": "mlp1",
    "fc2": "mlp2",
    "final_layer_norm": "mlp_ln",
    "embed_tokens": "token_embedding",
}
# Whole names whose parts alone do not say what they are.
WHOLE_NAMES = {
    "encoder.layer_norm.weight": "encoder.ln_post.weight",
    "encoder.layer_norm.bias": "encoder.ln_post.bias",
    "decoder.layer_norm.weight": "decoder.ln.weight",
    "decoder.layer_norm.bias": "decoder.ln.bias",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
}
_OUR_PARTS = {ours: theirs for theirs, ours in PART_NAMES.items()}
_OUR_WHOLE_NAMES = {ours: theirs for theirs, ours in WHOLE_NAMES.items()}
PREFIX = "model."  # WhisperForConditionalGeneration's; a bare WhisperModel's names lack it
# Fixed sinusoids the model computes itself, and the output projection, which is the token
# embedding (Whisper ties them).
_UNUSED = ("encoder.embed_positions.weight", "proj_out.weight")


def our_name(name: str) -> str:
    name = name.removeprefix(PREFIX)
    return WHOLE_NAMES.get(name) or ".".join(PART_NAMES.get(part, part) for part in name.split("."))


def transformers_name(name: str) -> str:
    """The name WhisperForConditionalGeneration gives one of our parameters."""
    return PREFIX + (_OUR_WHOLE_NAMES.get(name) or ".".join(_OUR_PARTS.get(part, part) for part in name.split(".")))


def dims_from_transformers_config(config: dict) -> ModelDimensions:
    try:
        state = int(config["d_model"])
        ffn = {int(config.get("encoder_ffn_dim", 4 * state)), int(config.get("decoder_ffn_dim", 4 * state))}
        if ffn != {4 * state} or config.get("activation_function", "gelu") != "gelu" or config.get("scale_embedding"):
            raise ModelFormatError(
                "config.json describes a Whisper variant this engine does not run (MLP width "
                f"{sorted(ffn)} instead of {4 * state}, activation {config.get('activation_function')!r}, "
                f"scaled embeddings {bool(config.get('scale_embedding'))})"
            )
        return ModelDimensions(
            n_mels=int(config["num_mel_bins"]),
            n_audio_ctx=int(config["max_source_positions"]),
            n_audio_state=state,
            n_audio_head=int(config["encoder_attention_heads"]),
            n_audio_layer=int(config["encoder_layers"]),
            n_vocab=int(config["vocab_size"]),
            n_text_ctx=int(config["max_target_positions"]),
            n_text_state=state,
            n_text_head=int(config["decoder_attention_heads"]),
            n_text_layer=int(config["decoder_layers"]),
        )
    except KeyError as missing:
        raise ModelFormatError(f"config.json lacks {missing}: not a transformers Whisper config") from None


def is_transformers_folder(folder: Path) -> bool:
    if not (folder / "config.json").exists() or not weight_files(folder):
        return False
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError:
        return False
    return config.get("model_type") == "whisper" and "d_model" in config


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, else the shards its index lists.  Other safetensors files beside them
    (a repo's `model.fp32-*` copies, say) hold the same weights again and are left alone."""
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return []
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError) as error:
        raise ModelFormatError(f"{index}: not a safetensors index ({error})") from None
    return [folder / shard for shard in shards]


def _as_numpy(array: mx.array) -> np.ndarray:
    return np.array(array if array.dtype in (mx.float16, mx.float32) else array.astype(mx.float32))


def load_transformers_folder(folder: str | Path) -> Checkpoint:
    """Dimensions, weights (our names and layouts) and alignment heads of a transformers folder."""
    folder = Path(folder)
    dims = dims_from_transformers_config(json.loads((folder / "config.json").read_text()))
    weights: dict[str, np.ndarray] = {}
    for file in weight_files(folder):
        try:
            tensors = mx.load(str(file))
        except (RuntimeError, ValueError, OSError) as error:
            raise ModelFormatError(f"{file}: cannot be read ({error}); download it again") from None
        for name, value in tensors.items():
            weights[name.removeprefix(PREFIX)] = _as_numpy(value)
    if "proj_out.weight" in weights and not np.array_equal(
        weights["proj_out.weight"], weights.get("decoder.embed_tokens.weight")
    ):
        raise ModelFormatError(f"{folder}: its output projection is not its token embedding, as Whisper's is")
    converted = {our_name(name): mlx_layout(name, value) for name, value in weights.items() if name not in _UNUSED}
    generation = folder / "generation_config.json"
    heads = json.loads(generation.read_text()).get("alignment_heads") if generation.exists() else None
    return checked(Checkpoint(dims, converted, heads), folder)
