"""Regenerate the openai-whisper reference fixtures in tests/fixtures/.

    scripts/reference_env.sh                               # once: creates .venv-ref
    .venv-ref/bin/python tests/reference/make_fixtures.py  # ~10 min on 2 cores

openai-whisper 20250625 (PyTorch, CPU, fp32) runs with exactly our engine's weights:
`whisper.convert.load_ct2(whisper.models.bundled_model_dir(name))`, loaded into its
`Whisper` model (see openai_ref.openai_model_from_ours). Everything runs at temperature 0
with a fixed seed and thread count, so a rerun gives the same files.

Files written:
- reference_mel.npz          openai-whisper's log-mel of jfk.flac (80 bins) and of
                             ps_goforward.flac (128 bins), float32 (n_mels, frames), no padding.
- reference_first_step_<model>.npz
                             `initial_tokens`, `logits` (float32, full vocabulary) of the last
                             initial position for jfk.flac's first window, and
                             `audio_features_head` (the encoder output's first 8 frames).
- reference_transcripts.json all the rest (layout documented in its "about" key).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch
from openai_ref import REPO, openai_model_from_ours, openai_whisper  # must run before `whisper` is imported
from speech import SPEECH_DIR, clips, english_clips, other_language_clips, wer

from whisper.models import bundled_model_dir

FIXTURES = REPO / "tests" / "fixtures"
MODELS = ("tiny.en", "base")
THREADS = 2
JFK = "jfk.flac"
MEL_128_CLIP = "ps_goforward.flac"
HEAD_FRAMES = 8

GREEDY = {"temperature": 0.0, "condition_on_previous_text": True, "fp16": False, "language": "en"}
# best_of only acts on sampling (temperature > 0); openai-whisper drops it at temperature 0,
# where beam search alone decides. Sampling is left out: it cannot be reproduced across engines.
BEAM = {**GREEDY, "beam_size": 5, "best_of": 5}
WORDS = {**GREEDY, "word_timestamps": True}
AUTO_LANGUAGE = {k: v for k, v in GREEDY.items() if k != "language"}

ABOUT = {
    "audio": "per clip: length, RMS and sha256 of openai-whisper's load_audio output (float32 bytes)",
    "mel": "reference_mel.npz arrays; each computed as log_mel_spectrogram(load_audio(clip), n_mels)",
    "first_step": (
        "mel input = log_mel_spectrogram(concat(audio, 480000 zeros), n_mels)[:, :3000] (what "
        "transcribe feeds its first window); logits = decoder output after initial_tokens, last "
        "position, before any logit filter"
    ),
    "greedy.clips.*.windows": (
        "one entry per decoded 30 s window: the tokens greedy decoding chose (timestamps and the "
        "final end-of-text included) and, per step, the gap between the top two logits after "
        "openai-whisper's logit filters (float16 precision; null when only one token was allowed). "
        "A small gap marks a near-tie where engines may legitimately diverge."
    ),
    "wer": "corpus WER over the English clips, EnglishTextNormalizer on both sides, jiwer",
    "language_detection": "model.detect_language on the first window's mel (as transcribe does)",
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def first_window_mel(audio: np.ndarray, n_mels: int) -> torch.Tensor:
    audio_mod = openai_whisper.audio
    mel = audio_mod.log_mel_spectrogram(audio, n_mels, padding=audio_mod.N_SAMPLES)
    return mel[:, : audio_mod.N_FRAMES]


class GapRecorder:
    """Records, per decoded window, each greedy step's chosen token and top-2 logit gap.

    Hooks openai-whisper's DecodingTask.run (one call per window) and GreedyDecoder.update
    (one call per step, with the logits after the logit filters, i.e. what argmax sees).
    """

    def __init__(self) -> None:
        self.windows: list[dict] | None = None
        decoding = openai_whisper.decoding
        run, update = decoding.DecodingTask.run, decoding.GreedyDecoder.update
        recorder = self

        def recording_run(task, mel):
            if recorder.windows is not None:
                recorder.windows.append({"tokens": [], "gaps": []})
            return run(task, mel)

        def recording_update(decoder, tokens, logits, sum_logprobs):
            if recorder.windows is not None:
                if logits.shape[0] != 1:
                    raise RuntimeError("the gap recorder expects one sequence per window")
                top = logits[0].topk(2).values
                gap = float(top[0] - top[1])
                window = recorder.windows[-1]
                window["tokens"].append(int(logits[0].argmax()))
                window["gaps"].append(float(np.float16(gap)) if np.isfinite(gap) else None)
            return update(decoder, tokens, logits, sum_logprobs)

        decoding.DecodingTask.run = recording_run
        decoding.GreedyDecoder.update = recording_update

    def record(self, fn: Callable[[], dict]) -> tuple[dict, list[dict]]:
        self.windows = []
        try:
            return fn(), self.windows
        finally:
            self.windows = None


def segments_of(result: dict, with_words: bool = False) -> list[dict]:
    keys = ("id", "seek", "start", "end", "text", "tokens", "avg_logprob", "compression_ratio", "no_speech_prob")
    out = []
    for segment in result["segments"]:
        item = {k: round(segment[k], 6) if isinstance(segment[k], float) else segment[k] for k in keys}
        if with_words:
            item["words"] = [
                {
                    "word": w["word"],
                    "start": round(w["start"], 3),
                    "end": round(w["end"], 3),
                    "probability": round(w["probability"], 4),
                }
                for w in segment["words"]
            ]
        out.append(item)
    return out


def audio_facts(clips: list[str]) -> dict:
    facts = {}
    for clip in clips:
        audio = openai_whisper.audio.load_audio(str(SPEECH_DIR / clip))
        facts[clip] = {
            "samples": int(audio.shape[0]),
            "rms": round(float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))), 7),
            "sha256_f32": hashlib.sha256(audio.astype(np.float32).tobytes()).hexdigest(),
        }
    return facts


def write_mel() -> dict:
    audio_mod = openai_whisper.audio
    arrays = {
        "jfk_80": audio_mod.log_mel_spectrogram(audio_mod.load_audio(str(SPEECH_DIR / JFK)), 80),
        "goforward_128": audio_mod.log_mel_spectrogram(audio_mod.load_audio(str(SPEECH_DIR / MEL_128_CLIP)), 128),
    }
    np.savez_compressed(FIXTURES / "reference_mel.npz", **{k: v.numpy().astype(np.float32) for k, v in arrays.items()})
    return {
        "file": "reference_mel.npz",
        "jfk_80": {"clip": JFK, "n_mels": 80},
        "goforward_128": {"clip": MEL_128_CLIP, "n_mels": 128},
    }


def write_first_step(name: str, model) -> dict:
    tokenizer = openai_whisper.tokenizer.get_tokenizer(
        model.is_multilingual, num_languages=model.num_languages, language="en", task="transcribe"
    )
    initial = list(tokenizer.sot_sequence)
    mel = first_window_mel(openai_whisper.audio.load_audio(str(SPEECH_DIR / JFK)), model.dims.n_mels)
    with torch.no_grad():
        features = model.embed_audio(mel[None])
        logits = model.logits(torch.tensor([initial]), features)[0, -1]
    file = f"reference_first_step_{name}.npz"
    np.savez_compressed(
        FIXTURES / file,
        initial_tokens=np.array(initial, dtype=np.int64),
        logits=logits.numpy().astype(np.float32),
        audio_features_head=features[0, :HEAD_FRAMES].numpy().astype(np.float32),
    )
    return {"file": file, "clip": JFK, "initial_tokens": initial, "argmax": int(logits.argmax())}


def transcribe(model, clip: str, options: dict) -> dict:
    return openai_whisper.transcribe(model, str(SPEECH_DIR / clip), verbose=None, **options)


def run_model(name: str, recorder: GapRecorder) -> dict:
    model = openai_model_from_ours(name)
    model_dir = bundled_model_dir(name)
    config_heads = json.loads((model_dir / "config.json").read_text()).get("alignment_heads")
    entry: dict = {
        "model_bin_sha256": sha256_file(model_dir / "model.bin"),
        "alignment_heads": model.alignment_heads.indices().T.tolist(),
        "config_alignment_heads": config_heads,
        "first_step": write_first_step(name, model),
    }
    english = [clip.file for clip in english_clips()]
    references = [clip.transcript for clip in english_clips()]

    def corpus_wer(results: dict) -> float:
        return round(wer(references, [results[c]["text"] for c in english]) / 100, 6)

    greedy = {}
    for clip in english:
        result, windows = recorder.record(lambda clip=clip: transcribe(model, clip, GREEDY))
        greedy[clip] = {"text": result["text"], "segments": segments_of(result), "windows": windows}
        print(f"{name} greedy {clip}: {result['text']}", flush=True)
    entry["greedy"] = {
        "options": GREEDY,
        "wer": corpus_wer(greedy),
        "clips": greedy,
    }

    beam = {}
    for clip in english:
        result = transcribe(model, clip, BEAM)
        beam[clip] = {"text": result["text"], "segments": segments_of(result)}
        print(f"{name} beam {clip}: {result['text']}", flush=True)
    entry["beam"] = {
        "options": BEAM,
        "wer": corpus_wer(beam),
        "clips": beam,
    }

    result = transcribe(model, JFK, WORDS)
    entry["word_timestamps"] = {
        "clip": JFK,
        "options": WORDS,
        "text": result["text"],
        "segments": segments_of(result, with_words=True),
    }

    if model.is_multilingual:
        detection, auto = {}, {}
        for other in other_language_clips():
            clip = other.file
            mel = first_window_mel(openai_whisper.audio.load_audio(str(SPEECH_DIR / clip)), model.dims.n_mels)
            with torch.no_grad():
                _, probs = model.detect_language(mel)
            top = sorted(probs.items(), key=lambda kv: -kv[1])[:5]
            detection[clip] = {
                "expected": other.language,
                "detected": top[0][0],
                "probability": round(top[0][1], 6),
                "top5": {lang: round(p, 6) for lang, p in top},
            }
            result = transcribe(model, clip, AUTO_LANGUAGE)
            auto[clip] = {"language": result["language"], "text": result["text"], "segments": segments_of(result)}
            print(f"{name} {clip}: {top[0][0]} {top[0][1]:.3f} {result['text']}", flush=True)
        entry["language_detection"] = detection
        entry["auto_language_greedy"] = {"options": AUTO_LANGUAGE, "clips": auto}
    return entry


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    recorder = GapRecorder()
    fixture = {
        "about": ABOUT,
        "generated_by": "tests/reference/make_fixtures.py",
        "openai_whisper": openai_whisper.__version__,
        "torch": torch.__version__,
        "audio": audio_facts([clip.file for clip in clips()]),
        "mel": write_mel(),
        "models": {name: run_model(name, recorder) for name in MODELS},
    }
    path = FIXTURES / "reference_transcripts.json"
    path.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for name in MODELS:
        entry = fixture["models"][name]
        print(f"{name}: greedy WER {entry['greedy']['wer']:.4f}, beam WER {entry['beam']['wer']:.4f}")


if __name__ == "__main__":
    main()
