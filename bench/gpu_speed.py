"""GPU speed: our MLX engine (fp16) next to openai-whisper (PyTorch fp16) and Hugging Face
transformers' Whisper (PyTorch fp16, SDPA attention), same weights, same audio, one CUDA GPU.

Here, on the CPU, once:   .venv/bin/python bench/gpu_speed.py --prepare .gpu/data
  writes the English dev clips as float32 waveforms (audio.npz) and the CPU engine's
  transcripts of them (reference.json, fp32, greedy), which the device machine cannot make.
On the device machine:    python bench/gpu_speed.py --data DIR --models DIR [--openai DIR]
                          [--check] [--quantization] [--speed] [--runs 5] [--out FILE]
  --models holds MLX folders (tiny.en/, base/: config.json + fp16 weights.safetensors);
  openai-whisper and transformers get the same weights converted in memory.  --openai
  names a folder holding openai-whisper's package renamed `openai_whisper` (ours is
  `whisper` too).  bench/GPU.md has the commands that carry all of it to the machine.

--check      GPU-only paths: the engine on the GPU in fp16, batched and unbatched; asserts
             batched text == unbatched text per clip and |WER(GPU fp16) - WER(CPU fp32)| <= 0.5.
--quantization  bench/quantization.py's rows on the GPU (float16, 8-bit, 4-bit).
--speed      the table: audio seconds per second for the dev folder (16 files) at batch 1
             and 16 and for a ~10-minute set (one file at batch 1; its 30-s pieces at batch
             16), the latency of one 30-s window, encoder ms per window, decoder ms per
             token, peak GPU memory, and the encoder's share of the measured fp16 matmul rate.

Every engine decodes greedily at temperature 0 (no fallback), with timestamps, English,
without conditioning on previous text.  Runs interleave the engines; medians are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from speech import wer  # noqa: E402

import whisper  # noqa: E402  (before mlx.core: OpenBLAS on CPUs)

whisper.configure()  # OpenBLAS before the engine's modules import mlx.core

OPTIONS = {"language": "en", "temperature": 0.0, "condition_on_previous_text": False}
MODELS = ("tiny.en", "base")
FOLDER_FILES = 16
LONG_SECONDS = 600.0
GAP_SECONDS = 0.5
SAMPLE_RATE = 16000
TORCH_DEVICE = "cuda"


# ------------------------------------------------------------------- data


def prepare(data: Path) -> None:
    """Waveforms of the English dev clips and the CPU engine's fp32 transcripts of them."""
    from speech import english_clips

    from whisper.audio import load_audio

    clips = english_clips()
    data.mkdir(parents=True, exist_ok=True)
    audio = {clip.file: load_audio(clip.path) for clip in clips}
    np.savez(data / "audio.npz", **audio)
    reference: dict = {"references": {clip.file: clip.transcript for clip in clips}, "models": {}}
    for name in MODELS:
        model = whisper.load_model(name, device="cpu")
        texts = {file: whisper.transcribe(model, samples, **OPTIONS)["text"] for file, samples in audio.items()}
        reference["models"][name] = {"texts": texts, "wer": wer([c.transcript for c in clips], list(texts.values()))}
        print(f"{name}: CPU fp32 WER {reference['models'][name]['wer']:.2f}", flush=True)
    (data / "reference.json").write_text(json.dumps(reference, indent=1))


@dataclasses.dataclass
class Data:
    audio: dict[str, np.ndarray]  # English dev clips, manifest order
    references: dict[str, str]
    cpu: dict  # per model: texts and WER of the CPU engine

    @property
    def folder(self) -> list[str]:
        return list(self.audio)[:FOLDER_FILES]

    def long(self) -> np.ndarray:
        """The clips joined, GAP_SECONDS apart, over and over, to LONG_SECONDS."""
        gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), np.float32)
        pieces, total = [], 0
        while total < LONG_SECONDS * SAMPLE_RATE:
            for samples in self.audio.values():
                pieces += [samples, gap]
                total += samples.size + gap.size
        return np.concatenate(pieces)[: int(LONG_SECONDS * SAMPLE_RATE)]


def load_data(folder: Path) -> Data:
    reference = json.loads((folder / "reference.json").read_text())
    with np.load(folder / "audio.npz") as npz:
        audio = {file: npz[file] for file in reference["references"]}
    return Data(audio, reference["references"], reference["models"])


# ---------------------------------------------------------------- engines


class Ours:
    label = "ours (MLX fp16)"

    def __init__(self, folder: Path):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        self.mx, self.tree_flatten = mx, tree_flatten
        self.model = whisper.load_model(str(folder), device="gpu")
        assert mx.default_device() == mx.gpu and self.model.dtype == mx.float16, "not on the GPU in fp16"

    def sync(self) -> None:
        self.mx.synchronize()

    def reset_peak(self) -> None:
        self.mx.reset_peak_memory()
        self.baseline = self.mx.get_active_memory()

    def peak_mib(self) -> float:
        """Weights plus the most working memory in use at once."""
        weights = sum(v.nbytes for _, v in self.tree_flatten(self.model.parameters()))
        return (self.mx.get_peak_memory() - self.baseline + weights) / 2**20

    def transcribe(self, audio: np.ndarray, **extra) -> str:
        return whisper.transcribe(self.model, audio, **OPTIONS, **extra)["text"]

    def batch(self, audios: list[np.ndarray], size: int, **extra) -> list[str]:
        return [r["text"] for r in whisper.transcribe_batch(self.model, audios, batch_size=size, **OPTIONS, **extra)]

    def mel(self, audios: list[np.ndarray]):
        from whisper.audio import N_SAMPLES

        windows = [whisper.log_mel_spectrogram(whisper.pad_or_trim(a, N_SAMPLES)).T for a in audios]
        return self.mx.stack(windows)

    def encode(self, mel):
        features = self.model.embed_audio(mel)
        self.mx.eval(features)
        return features

    def decode_steps(self, features) -> int:
        options = whisper.DecodingOptions(language="en", temperature=0.0)
        result = whisper.decode(self.model, features, options)
        return sum(len(r.tokens) + 1 for r in result)  # + the end of text


STEP_MODES = ("host", "fused", "chained")


def step_ms(
    folder: Path, audio: np.ndarray, mode: str, batches: tuple[int, ...] = (1, 16), steps: int = 100
) -> dict[int, float]:
    """The compiled decoder step alone, per batch size, median of 3 passes of `steps` steps.

    "host": argmax on the device, token ids back to the host each step (what the decoding loop
    does today); "fused": the same with the argmax compiled into the step's call
    (the backend's `step_then`); "chained": the ids stay on the device and feed the next step,
    nothing is read until the end (`mx.async_eval`), the most a loop that reads ids every k
    steps could gain."""
    import mlx.core as mx

    def argmax(logits: mx.array) -> mx.array:
        return mx.argmax(logits, axis=-1).astype(mx.int32)

    model = whisper.load_model(str(folder), device="gpu")
    backend = model.backend
    features = model.embed_audio(whisper.log_mel_spectrogram(whisper.pad_or_trim(audio)).T[None])
    sot = whisper.tokenizer.get_tokenizer(model.is_multilingual).sot

    def run(n: int, batch: int, audio: list) -> None:
        cache, tokens = backend.new_cache(batch), mx.full((batch, 1), sot, dtype=mx.int32)
        for position in range(n):
            offset = mx.array([position], dtype=mx.int32)
            if mode == "host":
                logits, cache = backend.step(tokens, audio, cache, offset)
                ids = argmax(logits)
            else:
                ids, cache = backend.step_then(argmax)(tokens, audio, cache, offset)
            if mode == "chained":
                tokens = ids.reshape(batch, 1)
                mx.async_eval(tokens, cache)
            else:
                mx.eval(ids, cache)
                tokens = mx.array(ids.tolist(), dtype=mx.int32).reshape(batch, 1)

    result = {}
    for batch in batches:
        audio = backend.audio_memory(mx.repeat(features, batch, axis=0))
        run(10, batch, audio)
        times = [timed(mx.synchronize, lambda b=batch, a=audio: run(steps, b, a))[0] / steps for _ in range(3)]
        result[batch] = 1000 * statistics.median(times)
    return result


def profile(folder: Path, data: Data, top: int = 25) -> str:
    """Where our batch-16 folder run spends host time (cProfile, after a warm-up pass), and
    the MLX allocator's peak with and without a cache limit."""
    import cProfile
    import io
    import pstats

    ours = Ours(folder)
    audio = [data.audio[f] for f in data.folder]
    ours.batch(audio, 16)
    profiler = cProfile.Profile()
    ours.reset_peak()
    profiler.runcall(ours.batch, audio, 16)
    ours.sync()
    peak = ours.peak_mib()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    ours.mx.clear_cache()
    ours.mx.set_cache_limit(0)
    ours.reset_peak()
    elapsed, _ = timed(ours.sync, lambda: ours.batch(audio, 16))
    return (
        f"{text.getvalue()}\npeak MiB {peak:.0f}; with cache limit 0: peak MiB {ours.peak_mib():.0f}, "
        f"folder b16 {elapsed:.3f} s"
    )


class TorchEngine:
    """What both PyTorch peers share: CUDA synchronisation and memory accounting."""

    torch = None
    model = None

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats()
        self.baseline = self.torch.cuda.memory_allocated()

    def peak_mib(self) -> float:
        """Own weights plus the most working memory in use at once (both peers share the process)."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return (self.torch.cuda.max_memory_allocated() - self.baseline + weights) / 2**20


class OpenAI(TorchEngine):
    label = "openai-whisper (PyTorch fp16)"

    def __init__(self, folder: Path, package_dir: Path):
        import torch

        sys.path.insert(0, str(package_dir))
        import openai_whisper

        self.torch, self.ow = torch, openai_whisper
        config = json.loads((folder / "config.json").read_text())
        dims = openai_whisper.model.ModelDimensions(
            **{f.name: config[f.name] for f in dataclasses.fields(openai_whisper.model.ModelDimensions)}
        )
        model = openai_whisper.model.Whisper(dims)
        state = {"encoder.positional_embedding": model.encoder.positional_embedding}
        for key, value in load_weights(folder).items():
            state[key.replace(".mlp1.", ".mlp.0.").replace(".mlp2.", ".mlp.2.")] = torch.from_numpy(value.copy())
        model.load_state_dict(state, strict=True)
        self.model = model.to(TORCH_DEVICE).eval()  # openai-whisper keeps fp32 weights, computes in fp16

    def transcribe(self, audio: np.ndarray, **extra) -> str:
        with self.torch.inference_mode():
            return self.ow.transcribe(self.model, audio, fp16=True, **OPTIONS, **extra)["text"]

    def batch(self, audios: list[np.ndarray], size: int, **extra) -> list[str]:
        """openai-whisper batches only one window per audio: `decode` on stacked windows."""
        options = self.ow.DecodingOptions(language="en", temperature=0.0, fp16=True, **extra)
        texts = []
        with self.torch.inference_mode():
            for start in range(0, len(audios), size):
                results = self.ow.decode(self.model, self.mel(audios[start : start + size]), options)
                texts += [r.text for r in results]
        return texts

    def mel(self, audios: list[np.ndarray]):
        ow = self.ow
        windows = [
            ow.log_mel_spectrogram(ow.pad_or_trim(self.torch.from_numpy(a).to(TORCH_DEVICE)), self.model.dims.n_mels)
            for a in audios
        ]
        return self.torch.stack(windows).half()

    def encode(self, mel):
        with self.torch.inference_mode():
            return self.model.embed_audio(mel)

    def decode_steps(self, features) -> int:
        options = self.ow.DecodingOptions(language="en", temperature=0.0, fp16=True)
        with self.torch.inference_mode():
            results = self.ow.decode(self.model, features, options)
        return sum(len(r.tokens) + 1 for r in results)  # + the end of text


class HuggingFace(TorchEngine):
    label = "transformers (PyTorch fp16, SDPA)"

    def __init__(self, folder: Path, suppressed: list[int]):
        import torch
        import transformers

        from whisper.audio import log_mel_frames
        from whisper.model import sinusoids
        from whisper.tokenizer import get_tokenizer

        self.torch, self.log_mel_frames = torch, log_mel_frames
        config = json.loads((folder / "config.json").read_text())
        multilingual = config["n_vocab"] >= 51865
        tok = get_tokenizer(multilingual, language="en", task="transcribe")
        self.eot = tok.eot
        hf_config = transformers.WhisperConfig(
            vocab_size=config["n_vocab"],
            num_mel_bins=config["n_mels"],
            encoder_layers=config["n_audio_layer"],
            encoder_attention_heads=config["n_audio_head"],
            decoder_layers=config["n_text_layer"],
            decoder_attention_heads=config["n_text_head"],
            d_model=config["n_audio_state"],
            encoder_ffn_dim=4 * config["n_audio_state"],
            decoder_ffn_dim=4 * config["n_text_state"],
            max_source_positions=config["n_audio_ctx"],
            max_target_positions=config["n_text_ctx"],
            activation_function="gelu",
            pad_token_id=tok.eot,
            bos_token_id=tok.eot,
            eos_token_id=tok.eot,
            decoder_start_token_id=tok.sot,
            tie_word_embeddings=True,
        )
        model = transformers.WhisperForConditionalGeneration._from_config(hf_config, attn_implementation="sdpa")
        state = {hf_name(k): torch.from_numpy(v.copy()) for k, v in load_weights(folder).items()}
        state["model.encoder.embed_positions.weight"] = torch.from_numpy(
            sinusoids(config["n_audio_ctx"], config["n_audio_state"])
        )
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"proj_out.weight"}, (missing, unexpected)
        model.tie_weights()
        self.model = model.to(TORCH_DEVICE).half().eval()
        assert self.model.config._attn_implementation == "sdpa"
        generation = transformers.GenerationConfig(
            decoder_start_token_id=tok.sot,
            eos_token_id=tok.eot,
            pad_token_id=tok.eot,
            bos_token_id=tok.eot,
            max_length=config["n_text_ctx"],
            no_timestamps_token_id=tok.no_timestamps,
            is_multilingual=multilingual,
            suppress_tokens=suppressed,
            begin_suppress_tokens=[*tok.encode(" "), tok.eot],
            max_initial_timestamp_index=50,
            return_timestamps=True,
        )
        if multilingual:
            generation.lang_to_id = {"<|en|>": tok.language_token}
            generation.task_to_id = {"transcribe": tok.transcribe, "translate": tok.translate}
        self.model.generation_config = generation
        self.tokenizer = tok
        self.language = {"language": "en", "task": "transcribe"} if multilingual else {}

    def generate(self, features, **kwargs):
        # All ones: every window is a full 30 s of (padded) audio, as for the other engines.
        mask = self.torch.ones(features.shape[0], features.shape[2], dtype=self.torch.long, device=TORCH_DEVICE)
        with self.torch.inference_mode():
            out = self.model.generate(
                features, attention_mask=mask, return_timestamps=True, do_sample=False, **self.language, **kwargs
            )
        sequences = out["sequences"] if isinstance(out, dict) else out
        return sequences.tolist()

    def texts(self, sequences) -> list[str]:
        return [self.tokenizer.decode([t for t in seq if t < self.eot]) for seq in sequences]

    def transcribe(self, audio: np.ndarray) -> str:
        mel = self.log_mel_frames(audio)
        if mel.shape[0] <= 3000:
            return self.texts(self.generate(self.mel([audio])))[0]
        features = self.torch.from_numpy(mel.T[None].copy()).to(TORCH_DEVICE, self.model.dtype)
        sequences = self.generate(features, condition_on_prev_tokens=False)
        return self.texts(sequences)[0]

    def batch(self, audios: list[np.ndarray], size: int) -> list[str]:
        texts = []
        for start in range(0, len(audios), size):
            texts += self.texts(self.generate(self.mel(audios[start : start + size])))
        return texts

    def mel(self, audios: list[np.ndarray]):
        from whisper.audio import N_FRAMES, pad_or_trim

        windows = [pad_or_trim(self.log_mel_frames(a), N_FRAMES, axis=0).T for a in audios]
        return self.torch.from_numpy(np.stack(windows)).to(TORCH_DEVICE, self.model.dtype)

    def encode(self, mel):
        with self.torch.inference_mode():
            return self.model.model.encoder(mel).last_hidden_state

    def decode_steps(self, mel) -> int:
        """Generates from the mel: the caller subtracts the encoder's time."""
        sequences = self.generate(mel)
        begin = self.tokenizer.timestamp_begin
        return sum(sum(1 for t in seq if t < self.eot or t >= begin) + 1 for seq in sequences)


HF_RENAMES = (
    ("encoder.blocks.", "model.encoder.layers."),
    ("decoder.blocks.", "model.decoder.layers."),
    (".cross_attn.query.", ".encoder_attn.q_proj."),
    (".cross_attn.key.", ".encoder_attn.k_proj."),
    (".cross_attn.value.", ".encoder_attn.v_proj."),
    (".cross_attn.out.", ".encoder_attn.out_proj."),
    (".cross_attn_ln.", ".encoder_attn_layer_norm."),
    (".attn.query.", ".self_attn.q_proj."),
    (".attn.key.", ".self_attn.k_proj."),
    (".attn.value.", ".self_attn.v_proj."),
    (".attn.out.", ".self_attn.out_proj."),
    (".attn_ln.", ".self_attn_layer_norm."),
    (".mlp1.", ".fc1."),
    (".mlp2.", ".fc2."),
    (".mlp_ln.", ".final_layer_norm."),
    ("encoder.ln_post.", "model.encoder.layer_norm."),
    ("decoder.ln.", "model.decoder.layer_norm."),
    ("decoder.token_embedding.", "model.decoder.embed_tokens."),
    ("decoder.positional_embedding", "model.decoder.embed_positions.weight"),
    ("encoder.conv", "model.encoder.conv"),
)


def hf_name(key: str) -> str:
    for ours, theirs in HF_RENAMES:
        if ours.startswith("."):
            key = key.replace(ours, theirs)
        elif key.startswith(ours):
            key = theirs + key[len(ours) :]
    return key


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    """Our MLX weights as float32 numpy in PyTorch's layout (conv kernels (out, in, kernel))."""
    import mlx.core as mx

    weights = mx.load(str(folder / "weights.safetensors"))
    weights.pop("encoder.positional_embedding", None)  # both peers make their own
    weights.pop("alignment_heads", None)
    converted = {}
    for key, value in weights.items():
        value = np.array(value.astype(mx.float32))
        converted[key] = value.transpose(0, 2, 1) if key.startswith("encoder.conv") and value.ndim == 3 else value
    return converted


# -------------------------------------------------------------- measuring


def timed(sync: Callable[[], None], run: Callable[[], object]) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    value = run()
    sync()
    return time.perf_counter() - start, value


def encoder_flops(config: dict, frames: int = 3000) -> float:
    """Multiply-adds x 2 of one window through the encoder (convolutions, projections, attention, MLP)."""
    d, n, mels = config["n_audio_state"], config["n_audio_ctx"], config["n_mels"]
    convs = 2 * frames * mels * 3 * d + 2 * n * d * 3 * d
    layer = 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * 4 * d
    return convs + config["n_audio_layer"] * layer


def matmul_rate() -> dict[str, float]:
    """Measured fp16 matrix-product rate (FLOP/s) of MLX and of PyTorch, 8192^3, median of 10."""
    import mlx.core as mx
    import torch

    n, rates = 8192, {}
    a, b = mx.random.normal((n, n)).astype(mx.float16), mx.random.normal((n, n)).astype(mx.float16)
    ta, tb = (torch.randn(n, n, device=TORCH_DEVICE, dtype=torch.float16) for _ in range(2))
    for label, sync, product in (
        ("mlx", mx.synchronize, lambda: mx.eval(a @ b)),
        ("torch", torch.cuda.synchronize, lambda: ta @ tb),
    ):
        product()
        times = [timed(sync, product)[0] for _ in range(10)]
        rates[label] = 2 * n**3 / statistics.median(times)
    return rates


@dataclasses.dataclass
class Measured:
    label: str
    times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    texts: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    peak_mib: float = float("nan")

    def add(self, key: str, seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)

    def median(self, key: str) -> float:
        return statistics.median(self.times[key]) if self.times.get(key) else float("nan")


def speed(data: Data, folder: Path, openai_dir: Path | None, runs: int) -> tuple[list[Measured], dict]:
    ours = Ours(folder)
    suppressed = whisper.decoding.DecodingTask(ours.model, whisper.DecodingOptions(language="en"))._suppressed_tokens()
    makers = [("openai-whisper", lambda: OpenAI(folder, openai_dir))] if openai_dir else []
    makers.append(("transformers", lambda: HuggingFace(folder, suppressed)))
    engines, results = [ours], [Measured(ours.label)]
    for label, make in makers:
        try:
            engines.append(make())
            results.append(Measured(engines[-1].label))
        except Exception:  # noqa: BLE001  (a peer that cannot load is reported, the rest still runs)
            print(f"{label} did not load:\n{traceback.format_exc()}", flush=True)

    audio = [data.audio[f] for f in data.folder]
    long = data.long()
    step = 30 * SAMPLE_RATE
    pieces = [long[i : i + step] for i in range(0, long.size, step)]
    seconds = {"folder": sum(a.size for a in audio) / SAMPLE_RATE, "long": long.size / SAMPLE_RATE}
    workloads: dict[str, Callable] = {
        "folder b1": lambda e: [e.transcribe(a) for a in audio],
        "folder b16": lambda e: e.batch(audio, 16),
        "30-s window b1": lambda e: [e.transcribe(pieces[0])],
        "10-min b1": lambda e: [e.transcribe(long)],
        "10-min b16": lambda e: e.batch(pieces, 16),
    }
    jfk = data.audio["jfk.flac"]

    def one_run(engine, result: Measured, warm_up: bool) -> None:
        for key, work in workloads.items():
            if warm_up and key.startswith("10-min"):
                continue  # same shapes as the others: nothing left to compile
            try:
                elapsed, texts = timed(engine.sync, lambda work=work: work(engine))
            except Exception:  # noqa: BLE001
                result.errors[key] = traceback.format_exc(limit=3)
                print(f"{result.label} {key} failed:\n{result.errors[key]}", flush=True)
                continue
            if not warm_up:
                result.add(key, elapsed)
                result.texts[key] = texts
        mel1, mel16 = engine.mel([pieces[0]]), engine.mel(pieces[:16])
        encode1, _ = timed(engine.sync, lambda: engine.encode(mel1))
        encode16, _ = timed(engine.sync, lambda: engine.encode(mel16))
        jfk_input = engine.mel([jfk])
        if isinstance(engine, HuggingFace):  # generate() runs the encoder too: take its time off
            decode, steps = timed(engine.sync, lambda: engine.decode_steps(jfk_input))
            decode -= encode1
        else:
            features = engine.encode(jfk_input)
            decode, steps = timed(engine.sync, lambda: engine.decode_steps(features))
        if not warm_up:
            result.add("encoder b1", encode1)
            result.add("encoder b16", encode16 / len(mel16))
            result.add("decoder per token", decode / steps)

    for engine, result in zip(engines, results):
        print(f"warming up {result.label}", flush=True)
        one_run(engine, result, warm_up=True)
    for run in range(runs):
        for engine, result in zip(engines, results):
            if run == 0:
                engine.reset_peak()
            one_run(engine, result, warm_up=False)
            if run == 0:
                result.peak_mib = engine.peak_mib()
            print(
                f"run {run + 1}/{runs} {result.label}: "
                + ", ".join(f"{k} {result.median(k):.3f}" for k in result.times),
                flush=True,
            )
    config = json.loads((folder / "config.json").read_text())
    facts = {"seconds": seconds, "flops": encoder_flops(config), "rates": matmul_rate(), "runs": runs}
    return results, facts


def beams(data: Data, folder: Path, openai_dir: Path | None, runs: int, beam_size: int = 5) -> str:
    """Beam search against greedy decoding, ours and openai-whisper's: the folder at batch 1 and
    16, audio seconds per second (medians of `runs`), and the WER of each."""
    engines = [Ours(folder)] + ([OpenAI(folder, openai_dir)] if openai_dir else [])
    audio = [data.audio[f] for f in data.folder]
    seconds = sum(a.size for a in audio) / SAMPLE_RATE
    references = [data.references[f] for f in data.folder]
    lines = [
        "| engine | decoding | folder b1 (audio s/s) | folder b16 (audio s/s) | WER b1 | WER b16 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for engine in engines:
        for label, extra in (("greedy", {}), (f"{beam_size} beams", {"beam_size": beam_size})):
            work = {
                "b1": lambda e=engine, x=extra: [e.transcribe(a, **x) for a in audio],
                "b16": lambda e=engine, x=extra: e.batch(audio, 16, **x),
            }
            cells = {}
            for key, job in work.items():
                try:
                    times = []
                    for _ in range(runs + 1):  # the first run warms up
                        elapsed, texts = timed(engine.sync, job)
                        times.append(elapsed)
                    cells[key] = (f"{seconds / statistics.median(times[1:]):.0f}", f"{wer(references, texts):.2f}")
                except Exception as error:  # noqa: BLE001  (openai-whisper's batched beam search fails)
                    cells[key] = (f"fails: {str(error)[:60]}", "-")
            b1, b16 = cells["b1"], cells["b16"]
            lines.append(f"| {engine.label} | {label} | {b1[0]} | {b16[0]} | {b1[1]} | {b16[1]} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def speed_table(results: list[Measured], facts: dict, data: Data) -> str:
    rate = max(facts["rates"].values())
    references = [data.references[f] for f in data.folder]
    lines = [
        "| engine | folder b1 | folder b16 | 10-min b1 | 10-min b16 | 30-s window ms | encoder ms b1 | "
        "encoder ms/window b16 | decoder ms/token | peak GPU MiB | encoder % of fp16 rate (b16) | WER folder b16 |",
        "| --- | " + " | ".join(["---"] * 11) + " |",
    ]
    for r in results:
        per_second = [
            facts["seconds"][key.split()[0] if key.startswith("folder") else "long"] / r.median(key)
            for key in ("folder b1", "folder b16", "10-min b1", "10-min b16")
        ]
        encoder16 = r.median("encoder b16")
        share = 100 * facts["flops"] / encoder16 / rate
        texts = r.texts.get("folder b16")
        error = f"{wer(references, texts):.2f}" if texts else "n/a"
        cells = [f"{x:.0f}" for x in per_second] + [
            f"{1000 * r.median('30-s window b1'):.0f}",
            f"{1000 * r.median('encoder b1'):.2f}",
            f"{1000 * encoder16:.2f}",
            f"{1000 * r.median('decoder per token'):.2f}",
            f"{r.peak_mib:.0f}",
            f"{share:.0f}",
            error,
        ]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ checks


def check(data: Data, models: Path) -> bool:
    """The engine on the GPU (fp16) against the CPU engine's fp32 transcripts."""
    import mlx.core as mx

    files = list(data.audio)
    audio = [data.audio[f] for f in files]
    references = [data.references[f] for f in files]
    passed = True
    for name in MODELS:
        started = time.perf_counter()
        model = whisper.load_model(str(models / name))
        assert mx.default_device() == mx.gpu and model.dtype == mx.float16
        single = [whisper.transcribe(model, a, **OPTIONS)["text"] for a in audio]
        batched = [r["text"] for r in whisper.transcribe_batch(model, audio, batch_size=16, **OPTIONS)]
        cpu = data.cpu[name]
        gpu_wer, batch_wer = wer(references, single), wer(references, batched)
        same_cpu = sum(text == cpu["texts"][f] for f, text in zip(files, single))
        same_batch = sum(a == b for a, b in zip(single, batched))
        ok = abs(gpu_wer - cpu["wer"]) <= 0.5 and abs(batch_wer - cpu["wer"]) <= 0.5
        passed &= ok
        print(
            f"check {name}: WER CPU fp32 {cpu['wer']:.2f}, GPU fp16 {gpu_wer:.2f}, GPU fp16 batched {batch_wer:.2f}; "
            f"GPU text == CPU text on {same_cpu}/{len(files)} clips, batched == unbatched on "
            f"{same_batch}/{len(files)}: {'pass' if ok else 'FAIL'} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        for f, a, b in zip(files, single, batched):
            if a != cpu["texts"][f] or a != b:
                print(f"  {f}\n    cpu     {cpu['texts'][f]!r}\n    gpu     {a!r}\n    batched {b!r}")
    return passed


def check_fused_linear() -> bool:
    """`whisper.cuda.fused_linear` against the same arithmetic in MLX's ops (fp32 from the same
    fp16 inputs), every combination of its options, the decoder's shapes, 1 to 32 rows."""
    import itertools

    import mlx.core as mx

    from whisper import cuda

    worst = 0.0
    for (depth, features), rows, bias, norm, residual, gelu in itertools.product(
        [(512, 2304), (768, 512), (2048, 512), (512, 51865)], [1, 5, 16, 32], *[[False, True]] * 4
    ):
        if residual and features != depth:
            continue
        rng = mx.random.split(mx.random.key(rows * depth + features))[0]
        x, w, b, g, beta, r = (
            mx.random.normal(shape, key=k).astype(mx.float16)
            for shape, k in zip(
                [(rows, depth), (features, depth), (features,), (depth,), (depth,), (rows, features)],
                mx.random.split(rng, 6),
            )
        )
        w = w * depth**-0.5
        options = {"norm": (g, beta, 1e-5) if norm else None, "residual": r if residual else None, "gelu": gelu}
        fused = cuda.fused_linear(x, w, b if bias else None, **options)
        assert fused is not None, "the kernel did not run"
        h = x.astype(mx.float32)
        if norm:
            h = mx.fast.layer_norm(h, g.astype(mx.float32), beta.astype(mx.float32), 1e-5)
        y = h @ w.astype(mx.float32).T + (b.astype(mx.float32) if bias else 0)
        if gelu:
            y = mx.array(0.5) * y * (1 + mx.erf(y / 2**0.5))
        if residual:
            y = y + r.astype(mx.float32)
        error = (mx.abs(fused.astype(mx.float32) - y).max() / (mx.abs(y).max() + 1e-6)).item()
        worst = max(worst, error)
    ok = worst < 2e-3
    print(f"check fused_linear: worst error relative to the largest value {worst:.2e}: {'pass' if ok else 'FAIL'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", type=Path, help="(CPU, here) write audio.npz and reference.json into this folder")
    parser.add_argument("--data", type=Path, help="folder with audio.npz and reference.json")
    parser.add_argument("--models", type=Path, help="folder with MLX model folders tiny.en/ and base/")
    parser.add_argument("--model", default="base", choices=MODELS, help="the model of the speed table")
    parser.add_argument("--openai", type=Path, help="folder holding openai-whisper's package as openai_whisper/")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--quantization", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--step", action="store_true", help="time our compiled decoder step alone")
    parser.add_argument("--beams", action="store_true", help="5 beams against greedy, ours and openai-whisper's")
    parser.add_argument("--profile", action="store_true", help="cProfile our batch-16 folder run")
    parser.add_argument("--unfused", action="store_true", help="MLX's own ops instead of whisper.cuda's kernel (A/B)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the numbers here as JSON")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    if not (args.data and args.models):
        parser.error("give --prepare DIR here, or --data and --models on the GPU machine")
    data = load_data(args.data)
    if args.unfused:
        whisper.cuda.MAX_ROWS = 0
    report: dict = {}
    with contextlib.suppress(ImportError):
        import torch

        report["device"] = torch.cuda.get_device_name()
    import mlx.core as mx

    report["mlx"] = mx.__version__
    print(json.dumps(report), flush=True)
    passed = True
    if args.check:
        passed = check_fused_linear() and check(data, args.models)
    if args.quantization:
        from quantization import HEADER, quantization_rows

        audio = list(data.audio.values())
        references = list(data.references.values())
        rows = [row for name in MODELS for row in quantization_rows(name, str(args.models / name), audio, references)]
        report["quantization"] = "\n".join([HEADER, *rows])
        print(report["quantization"], flush=True)
    if args.speed:
        results, facts = speed(data, args.models / args.model, args.openai, args.runs)
        report["speed"] = speed_table(results, facts, data)
        report["facts"] = facts
        report["measured"] = [dataclasses.asdict(r) for r in results]
        print(
            f"\n{args.model}, {facts['runs']} runs, medians; audio seconds per second; matmul rates (TFLOP/s): "
            + ", ".join(f"{k} {v / 1e12:.0f}" for k, v in facts["rates"].items())
        )
        print(report["speed"], flush=True)
    if args.beams:
        report["beams"] = beams(data, args.models / args.model, args.openai, args.runs)
    if args.step:
        report["step_ms"] = {m: step_ms(args.models / args.model, data.audio["jfk.flac"], m) for m in STEP_MODES}
        print(f"{args.model} decoder step alone (ms by mode and batch size): {report['step_ms']}", flush=True)
    if args.profile:
        report["profile"] = profile(args.models / args.model, data)
        print(report["profile"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))
    if not passed:
        raise SystemExit("check failed")


if __name__ == "__main__":
    main()
