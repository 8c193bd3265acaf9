"""Big models: encoder milliseconds per 30-s window and decoder milliseconds per token, ours
next to its peers, with full-size random weights (issue 16).

    .venv-ref/bin/python bench/big_models.py                       # CPU: small, medium, large-v3-turbo
    .venv-ref/bin/python bench/big_models.py --shapes tiny --runs 1 --tokens 8   # a smoke run
    python bench/big_models.py --device gpu                        # GPU: see bench/BIG_MODELS.md

Weights: for each shape of `whisper.catalog`, random weights from a fixed numpy seed
(tests/checkpoint_files.py's `random_weights`, float16 values), written once as an openai-whisper
`.pt` and as a Hugging Face transformers folder, from which every engine gets them:

- CPU: ours (MLX, float32, the compiled kernels; it loads the `.pt`, converted once and
  cached), ours-int8 (the same with `quantize=8`: the encoder's linear layers 8-bit, times 8-bit
  activations), openai-whisper (PyTorch, float32, `torch.load` of the `.pt`) and faster-whisper's
  engine, CTranslate2 int8 (the transformers folder through CTranslate2's TransformersConverter);
- GPU: ours (MLX, float16), openai-whisper (PyTorch, float16) and transformers (float16).

Encoder: one window's log-mel of real speech, median of --runs after a warm-up.  Decoder: greedy
decoding of the encoded window with the end of text suppressed, so that every engine decodes
exactly as many tokens as asked; milliseconds per token = (time for --tokens tokens - time for
2 tokens) / (tokens - 2), which leaves out the encoder and the sot sequence's pass.  Each engine
runs in its own process, one after another; peak RSS (VmHWM) is reported after loading and while
timing (the high-water mark is reset after loading).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "tests" / "reference", REPO / "tests", REPO):
    sys.path.insert(0, str(_path))

SHAPES = ("small", "medium", "large-v3-turbo")
ENGINES = {"cpu": ("ours", "ours-int8", "openai", "faster-int8"), "gpu": ("ours", "openai", "transformers")}
OURS = ("ours", "ours-int8")
CLIP = "jfk.flac"
SEED = 16
REPLY = "@@bench "  # marks the worker's reply among whatever libraries print


def _hwm_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _median_ms(run: Callable[[], object], runs: int) -> float:
    run()  # warm-up: first-use compilation and allocation
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


# ---------------------------------------------------------------- each engine, in its worker


def _ours(files: dict, device: str, quantize: int | None = None):
    """(encode, decode n tokens) of our engine."""
    import mlx.core as mx

    import whisper

    model = whisper.load_model(files["pt"], device, download_root=files["cache"], quantize=quantize)
    eot = whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages).eot
    mel = mx.array(_log_mel_numpy(files, model.dims.n_mels))
    features = model.embed_audio(mel.T[None])

    def encode() -> None:
        mx.eval(model.embed_audio(mel.T[None]))

    def decode(n: int) -> int:
        options = whisper.DecodingOptions(
            language="en", sample_len=n, without_timestamps=True, suppress_tokens=[-1, eot]
        )
        return len(whisper.decode(model, features[0], options).tokens)

    return encode, decode


def _openai(files: dict, device: str):
    import torch
    from openai_ref import openai_whisper

    checkpoint = torch.load(files["pt"], map_location="cpu", weights_only=True)
    model = openai_whisper.model.Whisper(openai_whisper.model.ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    del checkpoint
    # As openai-whisper runs float16: float32 weights, which its layers cast to the activations' type.
    model = (model.cuda() if device == "gpu" else model).float().eval()
    tokenizer = openai_whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
    mel = torch.from_numpy(_log_mel_numpy(files, model.dims.n_mels))  # openai-whisper's numbers, without ffmpeg
    mel = mel.cuda().half() if device == "gpu" else mel
    with torch.no_grad():
        features = model.embed_audio(mel[None])

    def encode() -> None:
        with torch.no_grad():
            model.embed_audio(mel[None])
        if device == "gpu":
            torch.cuda.synchronize()

    def decode(n: int) -> int:
        options = openai_whisper.DecodingOptions(
            language="en",
            sample_len=n,
            without_timestamps=True,
            suppress_tokens=[-1, tokenizer.eot],
            fp16=device == "gpu",
        )
        return len(openai_whisper.decode(model, features[0], options).tokens)

    return encode, decode


def _english_prompt(n_vocab: int) -> list[int]:
    """The sot sequence ours and openai-whisper decode after: English, transcribe, no timestamps."""
    from checkpoint_files import tokenizer_of

    return list(tokenizer_of(n_vocab, "en" if n_vocab >= 51865 else None).sot_sequence_including_notimestamps)


def _log_mel_numpy(files: dict, n_mels: int):
    """Our log-mel of the window, (n_mels, frames) float32: the same numbers as openai-whisper's."""
    import numpy as np

    import whisper

    whisper.configure()
    from whisper.audio import load_audio, log_mel_spectrogram

    mel = log_mel_spectrogram(load_audio(files["audio"]), n_mels, padding=480000)[:, :3000]
    return np.ascontiguousarray(np.array(mel), dtype=np.float32)


def _faster_int8(files: dict, device: str):
    import ctranslate2

    config = json.loads(Path(files["transformers"], "config.json").read_text())
    model = ctranslate2.models.Whisper(files["ct2"], device="cpu", compute_type="int8", intra_threads=os.cpu_count())
    features = ctranslate2.StorageView.from_array(_log_mel_numpy(files, config["num_mel_bins"])[None])
    encoded = model.encode(features)
    prompt = _english_prompt(config["vocab_size"])
    eot = config["eos_token_id"]

    def encode() -> None:
        model.encode(features)

    def decode(n: int) -> int:
        # max_length counts the prompt, and CTranslate2 may stop before it (the tokens returned are
        # what is counted); the prompt's last token comes back first.
        result = model.generate(
            encoded, [prompt], max_length=len(prompt) + n, suppress_tokens=[eot], suppress_blank=False
        )
        ids = result[0].sequences_ids[0]
        return len(ids) - int(ids[:1] == prompt[-1:])

    return encode, decode


def _transformers(files: dict, device: str):
    import torch
    import transformers

    model = transformers.WhisperForConditionalGeneration.from_pretrained(files["transformers"], dtype=torch.float16)
    model = model.cuda().eval()
    mel = torch.tensor(_log_mel_numpy(files, model.config.num_mel_bins)[None]).cuda().half()
    eot = model.config.eos_token_id
    prompt = _english_prompt(model.config.vocab_size)
    with torch.no_grad():
        encoded = model.model.encoder(input_features=mel).last_hidden_state

    def encode() -> None:
        with torch.no_grad():
            model.model.encoder(input_features=mel)
        torch.cuda.synchronize()

    def decode(n: int) -> int:
        ids = torch.tensor([prompt], device="cuda")
        past = None
        with torch.no_grad():
            for _ in range(n):
                out = model(
                    encoder_outputs=(encoded,),
                    decoder_input_ids=ids if past is None else ids[:, -1:],
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                logits = out.logits[:, -1]
                logits[:, eot] = -float("inf")
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        torch.cuda.synchronize()
        return ids.shape[1] - len(prompt)

    return encode, decode


_LOADERS = {
    "ours": _ours,
    "ours-int8": functools.partial(_ours, quantize=8),
    "openai": _openai,
    "faster-int8": _faster_int8,
    "transformers": _transformers,
}


def worker(engine: str, files: dict, device: str, runs: int, tokens: int) -> None:
    if engine in (*OURS, "faster-int8"):
        import whisper

        whisper.configure()
    start = time.perf_counter()
    encode, decode = _LOADERS[engine](files, device)
    load_s = time.perf_counter() - start
    load_peak = _hwm_mib()
    _reset_hwm()
    encoder_ms = _median_ms(encode, runs)
    short, long = decode(2), decode(tokens)
    short_ms, long_ms = _median_ms(lambda: decode(2), runs), _median_ms(lambda: decode(tokens), runs)
    result = {
        "engine": engine,
        "load_s": round(load_s, 2),
        "encoder_ms": round(encoder_ms, 1),
        "decoder_ms_per_token": round((long_ms - short_ms) / (long - short), 2),
        "tokens": [short, long],
        "peak_rss_load_mib": round(load_peak),
        "peak_rss_run_mib": round(_hwm_mib()),
    }
    print(REPLY + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the parent: files, then workers


def _ct2_from_transformers(folder: Path, out: Path) -> None:
    """CTranslate2's TransformersConverter on the folder.  It reads a tokenizer only for the
    strings of its vocabulary, of which CTranslate2 uses the special tokens' (it finds
    <|startoftranscript|> by name): a stand-in gives those their names and every other id a
    number."""
    import ctranslate2
    from checkpoint_files import tokenizer_of, vocabulary_names

    n_vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    tokenizer, names = tokenizer_of(n_vocab), vocabulary_names(n_vocab)

    class SpecialTokensOnly:
        additional_special_tokens = tuple(f"<|{code}|>" for code in tokenizer.all_language_codes)

        def get_vocab(self) -> dict[str, int]:
            return {name: i for i, name in enumerate(names[: tokenizer.timestamp_begin])}  # it adds timestamps

        def convert_tokens_to_ids(self, name: str) -> int:
            return tokenizer.special_tokens[name]

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return SpecialTokensOnly()

    Converter(str(folder)).convert(str(out), quantization="int8", force=True)


def prepare_files(shape: str, workdir: Path, engines: tuple[str, ...]) -> dict:
    import whisper

    whisper.configure()  # before anything imports MLX
    from checkpoint_files import random_weights, write_openai_pt, write_transformers_folder
    from speech import SPEECH_DIR

    from whisper.catalog import KNOWN_MODELS

    dims = KNOWN_MODELS[shape].dims
    files = {
        "pt": str(workdir / f"{shape}.pt"),
        "transformers": str(workdir / f"{shape}-hf"),
        "ct2": str(workdir / f"{shape}-ct2-int8"),
        "cache": str(workdir / "cache"),
        "audio": str(SPEECH_DIR / CLIP),
    }
    if not Path(files["pt"]).exists():
        weights = random_weights(dims, SEED)
        write_openai_pt(Path(files["pt"]), dims, weights)
        write_transformers_folder(Path(files["transformers"]), dims, weights)
        del weights
    if "faster-int8" in engines and not Path(files["ct2"], "model.bin").exists():
        _ct2_from_transformers(Path(files["transformers"]), Path(files["ct2"]))
    if set(OURS) & set(engines):  # converted here, so that the worker's load is a cached one
        from whisper.models import prepare

        prepare(files["pt"], Path(files["cache"]))
    return files


def run_worker(engine: str, files: dict, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", engine, "--files", json.dumps(files)]
    command += ["--device", args.device, "--runs", str(args.runs), "--tokens", str(args.tokens)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    replies = [line[len(REPLY) :] for line in out.stdout.splitlines() if line.startswith(REPLY)]
    if out.returncode or not replies:
        return {"engine": engine, "error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(replies[-1])


def table(results: dict[str, list[dict]], device: str) -> str:
    lines = [
        f"| shape | engine ({device}) | encoder ms / window | decoder ms / token | load s "
        "| peak RSS load MiB | peak RSS run MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape, rows in results.items():
        for row in rows:
            if "error" in row:
                lines.append(f"| {shape} | {row['engine']} | failed: {row['error']} | | | | |")
                continue
            cells = ("encoder_ms", "decoder_ms_per_token", "load_s", "peak_rss_load_mib", "peak_rss_run_mib")
            lines.append(f"| {shape} | {row['engine']} | " + " | ".join(str(row[c]) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=sorted(ENGINES), default="cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="names of whisper.catalog")
    parser.add_argument("--engines", nargs="+", default=None, help="default: every engine of the device")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=34, help="tokens decoded in the long decoding")
    parser.add_argument("--workdir", type=Path, default=None, help="kept between runs (default: a temporary one)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.files), args.device, args.runs, args.tokens)
        return
    engines = tuple(args.engines or ENGINES[args.device])
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        results = {}
        for shape in args.shapes:
            files = prepare_files(shape, workdir, engines)
            results[shape] = [run_worker(engine, files, args) for engine in engines]
            print(json.dumps({shape: results[shape]}), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}, {args.runs} runs, {args.tokens} tokens")
    print(table(results, args.device))


if __name__ == "__main__":
    main()
