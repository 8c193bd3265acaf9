"""Regenerate the reference side of tests/test_model_formats.py, in tests/fixtures/.

    .venv-ref/bin/python tests/reference/make_checkpoint_fixtures.py   # ~3 min on 2 cores

For each family of tests/checkpoint_files.py (small random weights from a fixed seed), this
writes the checkpoint in the formats the test writes it in, with the test's own writers, then:

- proves the writers faithful: `torch.load` of the `.pt` gives exactly the seeded weights under
  openai-whisper's names, and openai-whisper's `Whisper` loads them with `strict=True`;
  transformers' `WhisperForConditionalGeneration` loads the transformers folder with no missing,
  unexpected or mismatched keys, and its first-step logits agree with openai-whisper's;
  CTranslate2 loads the CTranslate2 folder, and its encoder output (and, for multilingual
  families, its language probabilities: the decoder's first step) agree with openai-whisper's;
- runs openai-whisper (PyTorch, CPU, fp32) on one 30-s window of each clip in CLIPS:
  `decode` greedy at temperature 0 (language detected by multilingual models, "en" for English
  ones; timestamps on), and the first-step logits after the sot sequence (language "en").

Files written (float32):
- checkpoint_<family>.npz
    mel_filters            openai-whisper's mel filters (its assets/mel_filters.npz) for n_mels
    mel_frames, mel_rows   openai-whisper's log-mel of the first clip's window, at those frames
    features_head          (windows, 4, state): the encoder output's first frames
    logit_ids              (windows, ids): the ids the logits are kept for (a fixed random
                           subset, every special token, and openai-whisper's top 16)
    logits_openai, logits_transformers   (windows, ids)
    initial_tokens         the sot sequence of the first-step logits
    tokens                 (windows, 224): openai-whisper's DecodingResult.tokens, -1 after them
- checkpoint_reference.json  the options, clips, per-window language and smallest top-2 gap of
  the greedy steps (a near-tie would be a legitimate divergence), versions, and openai-whisper's
  alignment heads of every model name it knows.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ctranslate2
import numpy as np
import torch
from make_fixtures import GapRecorder, first_window_mel
from openai_ref import REPO, openai_whisper  # must run before `whisper` is imported
from speech import SPEECH_DIR

import whisper

whisper.configure()
import transformers  # noqa: E402  (after torch and openai-whisper, as openai_ref asks)
from checkpoint_files import (  # noqa: E402
    FAMILIES,
    openai_state_dict,
    seeded_weights,
    write_ct2_folder,
    write_openai_pt,
    write_transformers_folder,
)

FIXTURES = REPO / "tests" / "fixtures"
CLIPS = ("jfk.flac", "leopard_de.wav", "cheetah_es.wav")
THREADS = 2
HEAD_FRAMES = 4
MEL_STRIDE = 50
RANDOM_IDS = 1024
TOP = 16
LOGITS_TOLERANCE = 1e-4


def openai_tokenizer(model, language: str | None):
    return openai_whisper.tokenizer.get_tokenizer(
        model.is_multilingual, num_languages=model.num_languages, language=language, task="transcribe"
    )


def logit_ids(n_vocab: int, eot: int, top: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(n_vocab)
    chosen = rng.choice(eot, RANDOM_IDS, replace=False)
    return np.unique(np.concatenate([chosen, np.arange(eot, n_vocab), top])).astype(np.int32)


def openai_from_pt(path: Path, dims, weights: dict[str, np.ndarray]):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    expected = openai_state_dict(dims, weights)
    state = checkpoint["model_state_dict"]
    assert checkpoint["dims"] == dataclasses.asdict(dims)
    assert list(state) == list(expected), "the .pt holds other tensors than the seeded weights"
    for name, value in expected.items():
        assert np.array_equal(state[name].float().numpy(), value), f"{name} differs after torch.load"
    model = openai_whisper.model.Whisper(openai_whisper.model.ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def transformers_from_folder(folder: Path):
    model, info = transformers.WhisperForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    problems = {kind: keys for kind, keys in info.items() if keys and kind != "error_msgs"}
    assert not problems, f"transformers did not load the folder whole: {problems}"
    return model.eval()


def ct2_differences(folder: Path, model, mel: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
    """How far CTranslate2, on the test-written folder, is from openai-whisper: the encoder's
    output, and (multilingual models) the language probabilities, which come from the decoder's
    first step over the language tokens."""
    ct2 = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    encoded = ct2.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None].numpy())), to_cpu=True)
    differences = {"encoder": float(np.abs(np.array(encoded) - features.numpy()).max())}
    if model.is_multilingual:
        ours = dict(ct2.detect_language(encoded)[0])
        with torch.no_grad():
            _, theirs = model.detect_language(mel)
        differences["language_probabilities"] = max(abs(ours[f"<|{code}|>"] - p) for code, p in theirs.items())
    return differences


def family_fixture(family: str, work: Path) -> dict:
    dims = FAMILIES[family]
    weights = seeded_weights(family)
    model = openai_from_pt(write_openai_pt(work / f"{family}.pt", dims, weights), dims, weights)
    hf = transformers_from_folder(write_transformers_folder(work / f"{family}-hf", dims, weights))
    ct2_folder = write_ct2_folder(work / f"{family}-ct2", dims, weights)
    english = openai_tokenizer(model, "en" if model.is_multilingual else None)
    initial = list(english.sot_sequence)
    recorder = GapRecorder()
    arrays: dict[str, list] = {k: [] for k in ("features_head", "logit_ids", "logits_openai", "logits_transformers")}
    arrays["tokens"] = []
    mel_rows = None
    windows = []
    for clip in CLIPS:
        mel = first_window_mel(openai_whisper.audio.load_audio(str(SPEECH_DIR / clip)), dims.n_mels)
        if mel_rows is None:
            mel_rows = mel[:, ::MEL_STRIDE].T.numpy()
        with torch.no_grad():
            features = model.embed_audio(mel[None])
            logits = model.logits(torch.tensor([initial]), features)[0, -1].numpy()
            hf_logits = hf(input_features=mel[None], decoder_input_ids=torch.tensor([initial])).logits[0, -1].numpy()
        gap = float(np.abs(hf_logits - logits).max())
        assert gap < LOGITS_TOLERANCE, f"{family} {clip}: transformers and openai-whisper differ by {gap}"
        ct2_gaps = ct2_differences(ct2_folder, model, mel, features)
        assert max(ct2_gaps.values()) < LOGITS_TOLERANCE, f"{family} {clip}: CTranslate2 differs: {ct2_gaps}"
        ids = logit_ids(dims.n_vocab, english.eot, np.argsort(-logits)[:TOP])
        arrays["features_head"].append(features[0, :HEAD_FRAMES].numpy())
        arrays["logit_ids"].append(ids)
        arrays["logits_openai"].append(logits[ids])
        arrays["logits_transformers"].append(hf_logits[ids])
        options = openai_whisper.DecodingOptions(
            language=None if model.is_multilingual else "en", temperature=0.0, fp16=False
        )
        result, steps = recorder.record(lambda mel=mel, options=options: openai_whisper.decode(model, mel, options))
        chosen = result.tokens
        arrays["tokens"].append(chosen)
        gaps = [g for g in steps[0]["gaps"] if g is not None]
        windows.append(
            {
                "clip": clip,
                "language": result.language,
                "tokens": len(chosen),
                "smallest_gap": min(gaps) if gaps else None,
                "transformers_vs_openai_logits": gap,
                "ctranslate2_vs_openai": ct2_gaps,
            }
        )
        print(f"{family} {clip}: {result.language}, {len(chosen)} tokens, smallest gap {windows[-1]['smallest_gap']}")
    width = max(len(ids) for ids in arrays["logit_ids"])
    tokens = np.full((len(CLIPS), dims.n_text_ctx // 2), -1, dtype=np.int32)
    for row, chosen in zip(tokens, arrays.pop("tokens")):
        row[: len(chosen)] = chosen

    def padded(rows: list[np.ndarray], fill) -> np.ndarray:
        return np.stack([np.pad(r, (0, width - len(r)), constant_values=fill) for r in rows])

    np.savez_compressed(
        FIXTURES / f"checkpoint_{family}.npz",
        mel_filters=openai_whisper.audio.mel_filters("cpu", dims.n_mels).numpy().astype(np.float32),
        mel_frames=np.arange(0, 3000, MEL_STRIDE, dtype=np.int32),
        mel_rows=mel_rows.astype(np.float32),
        features_head=np.stack(arrays["features_head"]).astype(np.float32),
        logit_ids=padded(arrays["logit_ids"], -1),
        logits_openai=padded(arrays["logits_openai"], np.nan).astype(np.float32),
        logits_transformers=padded(arrays["logits_transformers"], np.nan).astype(np.float32),
        initial_tokens=np.array(initial, dtype=np.int32),
        tokens=tokens,
    )
    return {"dims": dataclasses.asdict(dims), "windows": windows}


def alignment_heads() -> dict[str, list[list[int]]]:
    """openai-whisper's alignment heads of every name in its table, as [layer, head] pairs."""
    from whisper.catalog import KNOWN_MODELS

    heads = {}
    for name, mask in openai_whisper._ALIGNMENT_HEADS.items():
        dims = KNOWN_MODELS[name].dims
        holder = openai_whisper.model.Whisper.__new__(openai_whisper.model.Whisper)
        torch.nn.Module.__init__(holder)
        holder.dims = openai_whisper.model.ModelDimensions(**dataclasses.asdict(dims))
        holder.set_alignment_heads(mask)
        heads[name] = holder.alignment_heads.to_sparse().indices().T.tolist()
    return heads


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as work:
        families = {family: family_fixture(family, Path(work)) for family in FAMILIES}
    reference = {
        "generated_by": "tests/reference/make_checkpoint_fixtures.py",
        "openai_whisper": openai_whisper.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "clips": list(CLIPS),
        "decode_options": "temperature 0, fp16 False, language detected (multilingual) or en, timestamps on",
        "families": families,
        "alignment_heads": alignment_heads(),
    }
    path = FIXTURES / "checkpoint_reference.json"
    path.write_text(json.dumps(reference, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
