"""CPU speed: our MLX Whisper next to openai-whisper and faster-whisper, on this machine (issue 6).

    scripts/reference_env.sh           # once: creates .venv-ref
    .venv-ref/bin/python bench/cpu_speed.py [--runs 3] [--models tiny.en base] [--clips jfk long] [--engines ...]

Every engine uses the same weights: our bundled CTranslate2 models (faster-whisper reads
the folder itself, int8 and float32; our engine converts it to MLX; openai-whisper, the
fp32 reference, gets our converter's fp32 weights as a PyTorch state dict). All decode
at temperature 0 (no fallback), greedily or with --beam-size beams (each engine's own beam
search), with timestamps, conditioned on previous text, language English.

Each engine+model runs in its own worker process, so its peak RSS is its own. Workers stay
alive and take turns, run by run and clip by clip, so load drift on the machine spreads
over all engines instead of biasing one. Timings exclude model loading and a warm-up.
Up to --runs runs, but no run starts that would end past --budget-minutes (the slowest
peer, openai-whisper on the long clip, dominates; a loaded machine gets fewer runs);
--models, --clips and --engines run it in parts.
Reported per engine, model and clip: median wall seconds, real-time factor (seconds per
second of audio), peak RSS while transcribing (the kernel's high-water mark is reset after
loading), median ours / faster-whisper int8 and whether the text is identical to
openai-whisper's. With --beam-size, our greedy decoding runs beside the others too
("ours-greedy"), and each cell reports what the beams cost: ours / ours greedy, the largest on
the line `beams_vs_greedy`. With --wer, also the WER on the English dev clips (ours and
openai-whisper's, one pass each). The last line is
`ratio_vs_faster_whisper_int8 <the largest ours / faster-whisper-int8 ratio over the cells>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "reference"
ENGINES = ("ours", "openai", "faster-int8", "faster-fp32")
GREEDY_BESIDE_BEAMS = "ours-greedy"  # ours without beams, beside the engines' beam searches
# The dev-set pass is slow; faster-whisper's accuracy is not what we compare.
WER_ENGINES = ("ours", "openai")
MODELS = ("tiny.en", "base")
CLIPS = ("jfk", "long")
WARMUP_CLIP = "ps_goforward.flac"
REPLY = "@@bench "  # marks the worker's replies among whatever libraries print
# Intel OpenMP (CTranslate2) and libgomp (torch) spin their threads after each parallel
# region; a short pause keeps one worker's spinning from slowing the next one's turn.
SETTLE_SECONDS = 0.3


# ---------------------------------------------------------------- worker side


def _hwm_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _load_engine(engine: str, model: str, prepared: dict):
    """Load one engine+model and return a function: audio path -> text."""
    threads = os.cpu_count() or 1
    beam_size = None if engine == GREEDY_BESIDE_BEAMS else prepared["beam_size"]  # None: greedy
    if engine in ("ours", GREEDY_BESIDE_BEAMS):
        sys.path.insert(0, str(REPO))
        import whisper

        loaded = whisper.load_model(model)

        def run(path: str) -> str:
            return whisper.transcribe(loaded, path, language="en", temperature=0.0, beam_size=beam_size)["text"]

        return run
    if engine == "openai":
        sys.path.insert(0, str(REFERENCE))
        import torch
        from openai_ref import openai_whisper

        torch.set_num_threads(threads)
        saved = torch.load(prepared["openai_state"][model], weights_only=True)
        loaded = openai_whisper.model.Whisper(openai_whisper.model.ModelDimensions(**saved["dims"]))
        loaded.load_state_dict(saved["state"])
        loaded.set_alignment_heads(openai_whisper._ALIGNMENT_HEADS[model])
        loaded.eval()
        del saved

        def run(path: str) -> str:
            options = {"temperature": 0.0, "condition_on_previous_text": True, "fp16": False, "language": "en"}
            options["beam_size"] = beam_size
            return openai_whisper.transcribe(loaded, path, verbose=None, **options)["text"]

        return run
    from faster_whisper import WhisperModel

    compute_type = {"faster-int8": "int8", "faster-fp32": "float32"}[engine]
    loaded = WhisperModel(prepared["model_dir"][model], device="cpu", compute_type=compute_type, cpu_threads=threads)

    def run(path: str) -> str:
        segments, _ = loaded.transcribe(
            path,
            language="en",
            beam_size=beam_size or 1,
            temperature=0.0,
            condition_on_previous_text=True,
            vad_filter=False,
        )
        return "".join(segment.text for segment in segments)

    return run


def worker(engine: str, model: str, prepared_path: str) -> None:
    """Serve commands (JSON lines on stdin) until stdin closes; reply on stdout."""
    prepared = json.loads(Path(prepared_path).read_text())

    def reply(**payload) -> None:
        sys.stdout.write(REPLY + json.dumps(payload) + "\n")
        sys.stdout.flush()

    start = time.perf_counter()
    run = _load_engine(engine, model, prepared)
    reply(load_s=time.perf_counter() - start, loading_peak_kib=_hwm_kib())
    _reset_hwm()
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "transcribe":
            start = time.perf_counter()
            text = run(command["path"])
            reply(seconds=time.perf_counter() - start, text=text)
        elif command["op"] == "peak":
            reply(transcribing_peak_kib=_hwm_kib())


# ---------------------------------------------------------------- parent side


def prepare(workdir: Path, models: list[str], engines: list[str], beam_size: int | None) -> Path:
    """Resolve model folders, convert ours into its cache, save openai-whisper state dicts.

    Workers read the result, so none of them loads more than its own engine.
    """
    import torch
    from openai_ref import openai_model_from_ours

    import whisper
    from whisper.models import bundled_model_dir

    prepared: dict = {"model_dir": {}, "openai_state": {}, "beam_size": beam_size}
    for name in models:
        prepared["model_dir"][name] = str(bundled_model_dir(name))
        if "ours" in engines:
            whisper.load_model(name)  # converts once into the cache: workers then load as users do
        if "openai" in engines:
            model = openai_model_from_ours(name)
            path = workdir / f"openai-{name}.pt"
            torch.save({"dims": dataclasses.asdict(model.dims), "state": model.state_dict()}, path)
            prepared["openai_state"][name] = str(path)
    path = workdir / "prepared.json"
    path.write_text(json.dumps(prepared))
    return path


def make_long_clip(path: Path, english: list[Path], seconds: float) -> None:
    """Join English dev clips, 0.5 s apart, up to `seconds`."""
    rate, pcm = 16000, bytearray()
    gap = bytes(2 * rate // 2)
    for clip in english:
        command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(clip)]
        command += ["-f", "s16le", "-ac", "1", "-ar", str(rate), "-"]
        decoded = subprocess.run(command, check=True, capture_output=True).stdout
        if pcm and len(pcm) + len(decoded) > 2 * rate * seconds:
            break
        pcm += decoded + gap
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(pcm))


@dataclass
class Worker:
    engine: str
    model: str
    process: subprocess.Popen
    load_s: float = 0.0
    loading_peak_kib: int = 0
    transcribing_peak_kib: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)
    last_text: dict[str, str] = field(default_factory=dict)  # per timed clip; greedy is deterministic
    dev_texts: dict[str, str] = field(default_factory=dict)
    dev_seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.engine} {self.model}"

    def read_reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        raise RuntimeError(f"worker {self.label} exited (code {self.process.wait()}); see its output above")

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        answer = self.read_reply()
        time.sleep(SETTLE_SECONDS)
        return answer


def start_worker(engine: str, model: str, prepared_path: Path) -> Worker:
    process = subprocess.Popen(
        [sys.executable, __file__, "--worker", engine, model, str(prepared_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    w = Worker(engine, model, process)
    loaded = w.read_reply()
    w.load_s, w.loading_peak_kib = loaded["load_s"], loaded["loading_peak_kib"]
    return w


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def report(workers: list[Worker], clips: dict[str, float]) -> tuple[str, float | None, float | None]:
    """The markdown table, the largest ours / faster-whisper-int8 ratio (None without both) and
    the largest ours / ours greedy (None without beams)."""
    from speech import wer

    header = (
        "| model | clip | engine | median s | RTF | peak RSS (MiB) | ours / fw-int8 | ours / ours greedy "
        "| text = fp32 reference |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    by_key = {(w.engine, w.model): w for w in workers}
    ratios: list[float] = []
    beam_costs: list[float] = []

    def ratio_to(engine: str, model: str, clip: str) -> float | None:
        ours, other = by_key.get(("ours", model)), by_key.get((engine, model))
        return statistics.median(ours.times[clip]) / statistics.median(other.times[clip]) if ours and other else None

    for model in dict.fromkeys(w.model for w in workers):
        for clip, seconds in clips.items():
            reference = by_key.get(("openai", model))
            ratio, beam_cost = ratio_to("faster-int8", model, clip), ratio_to(GREEDY_BESIDE_BEAMS, model, clip)
            ratios += [ratio] if ratio else []
            beam_costs += [beam_cost] if beam_cost else []
            for w in (w for w in workers if w.model == model):
                median = statistics.median(w.times[clip])
                same = (
                    "-" if reference is None or w is reference else str(w.last_text[clip] == reference.last_text[clip])
                )
                shown = [f"{r:.2f}" if w.engine == "ours" and r else "" for r in (ratio, beam_cost)]
                lines.append(
                    f"| {model} | {clip} {seconds:.0f} s | {w.engine} | {median:.2f} | {median / seconds:.3f} "
                    f"| {mib(w.transcribing_peak_kib)} | {shown[0]} | {shown[1]} | {same} |"
                )
    measured = [w for w in workers if w.dev_texts]
    if measured:
        references = english_references()
        lines += ["", "| engine | model | WER (English dev clips) | dev-set pass (s) |", "|---|---|---|---|"]
        for w in measured:
            error_rate = wer(list(references.values()), [w.dev_texts[c] for c in references])
            lines.append(f"| {w.engine} | {w.model} | {error_rate:.2f}% | {w.dev_seconds:.1f} |")
    lines += ["", "| engine | model | load (s) | peak RSS loading (MiB) |", "|---|---|---|---|"]
    lines += [f"| {w.engine} | {w.model} | {w.load_s:.1f} | {mib(w.loading_peak_kib)} |" for w in workers]
    return "\n".join(lines), max(ratios) if ratios else None, max(beam_costs) if beam_costs else None


def english_references() -> dict[str, str]:
    from speech import english_clips

    return {clip.file: clip.transcript for clip in english_clips()}


def measure(workers: list[Worker], clips: dict[str, Path], runs: int, deadline: float, with_wer: bool) -> int:
    """Warm-up (and the dev-set pass), then up to `runs` timed runs while another one fits before `deadline`."""
    from speech import SPEECH_DIR

    for w in workers:
        w.ask(op="transcribe", path=str(SPEECH_DIR / WARMUP_CLIP))
        if with_wer and w.engine in WER_ENGINES:
            for clip in english_references():
                answer = w.ask(op="transcribe", path=str(SPEECH_DIR / clip))
                w.dev_texts[clip] = answer["text"]
                w.dev_seconds += answer["seconds"]
            print(f"dev set done: {w.label} in {w.dev_seconds:.1f} s", flush=True)
    done = 0
    while done < runs:
        run_started = time.perf_counter()
        turn = workers[done % len(workers) :] + workers[: done % len(workers)]
        for key, path in clips.items():
            for w in turn:
                answer = w.ask(op="transcribe", path=str(path))
                w.times.setdefault(key, []).append(answer["seconds"])
                w.last_text[key] = answer["text"]
                print(f"run {done + 1} {key} {w.label}: {answer['seconds']:.2f} s", flush=True)
        done += 1
        now = time.perf_counter()
        if done < runs and now + (now - run_started) > deadline:
            print(f"stopping after {done} run(s): another would pass the time budget", flush=True)
            break
    for w in workers:
        w.transcribing_peak_kib = w.ask(op="peak")["transcribing_peak_kib"]
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="most timed runs per clip and engine (default 3)")
    parser.add_argument(
        "--budget-minutes", type=float, default=14.0, help="start no run that would end later (default 14)"
    )
    parser.add_argument(
        "--wer", action="store_true", help="also the WER of ours and openai-whisper on the English dev clips"
    )
    parser.add_argument("--long-seconds", type=float, default=120.0, help="length of the long clip (default 120)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--clips", nargs="+", default=list(CLIPS), choices=CLIPS)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument(
        "--beam-size", type=int, default=None, help="beams for every engine (default: greedy decoding)"
    )
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "MODEL", "PREPARED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    started = time.perf_counter()
    # Only this parent process loads the reference helpers (and with them torch).
    sys.path.insert(0, str(REFERENCE))
    import openai_ref  # noqa: F401  (puts tests/ and ours on sys.path)
    from speech import SPEECH_DIR, english_clips

    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="menny-bench-") as tmp:
        workdir = Path(tmp)
        paths = {"jfk": SPEECH_DIR / "jfk.flac", "long": workdir / "long.wav"}
        make_long_clip(paths["long"], [clip.path for clip in english_clips()], args.long_seconds)
        engines = list(args.engines)
        if args.beam_size and "ours" in engines:
            engines.insert(engines.index("ours") + 1, GREEDY_BESIDE_BEAMS)
        prepared_path = prepare(workdir, args.models, engines, args.beam_size)
        from whisper.audio import SAMPLE_RATE, load_audio

        seconds = {clip: len(load_audio(path)) / SAMPLE_RATE for clip, path in paths.items()}
        workers = []
        try:
            for model in args.models:
                for engine in engines:
                    print(f"loading {engine} {model}", flush=True)
                    workers.append(start_worker(engine, model, prepared_path))
            deadline = started + 60 * args.budget_minutes
            clips = {clip: paths[clip] for clip in args.clips}
            runs = measure(workers, clips, args.runs, deadline, args.wer)
        finally:
            for w in workers:
                w.process.stdin.close()
                w.process.wait()
    table, worst, beam_cost = report(workers, {clip: seconds[clip] for clip in args.clips})
    print(
        f"\n{os.cpu_count()} CPU cores, load average {load_at_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; {runs} run(s), medians; "
        f"{f'{args.beam_size} beams' if args.beam_size else 'greedy'}, temperature 0, English."
    )
    print(table)
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s)")
    if beam_cost is not None:
        print(f"beams_vs_greedy {beam_cost:.3f}")
    if worst is not None:
        print(f"ratio_vs_faster_whisper_int8 {worst:.3f}")


if __name__ == "__main__":
    main()
