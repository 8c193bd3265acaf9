"""How the corpus path (python -m whisper.corpus) scales: measured here, projected beyond.

    .venv/bin/python bench/corpus_scale.py                        # CPU: tiny.en, both paths
    .venv/bin/python bench/corpus_scale.py --device gpu --model base --batch-size 16 --repeat 20

Measures, on the English dev clips (each `--repeat` times, as separate files):

1. the CPU work per second of audio of reading a file (PyAV decode and resampling) and of its
   log-mel (numpy), one thread, the best of three passes: what sizes the CPUs per GPU;
2. the corpus in this process (`run_in_process`): wall seconds, files per second, seconds of
   audio per second (model load included);
3. the same on a local Ray cluster (`run_on_ray`; Ray's start timed apart): the overhead per
   file is Ray's wall, less its start, less the in-process wall, over the files;
4. the projection for 10,000 hours on 1, 8 and 64 GPUs from a per-GPU rate (the one measured
   here with `--device gpu`, else `--gpu-rate`) and what each size asks of the CPUs, the
   object store and the storage.

Prints markdown for bench/SCALE.md.  Figures from a shared, busy machine are indicative only.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from speech import english_clips  # noqa: E402

import whisper  # noqa: E402

whisper.configure()  # before the engine's modules import MLX
from whisper.audio import HOP_LENGTH, N_FRAMES, SAMPLE_RATE, load_audio, log_mel_frames  # noqa: E402
from whisper.batch import batch_options  # noqa: E402
from whisper.corpus import Archive, Job, Tally, list_audio, run_in_process  # noqa: E402

ARCHIVE_HOURS = 10_000
GPU_COUNTS = (1, 8, 64)
# What each second of audio weighs between the readers and the holders: 16-bit samples and
# float32 log-mel (80 bins, 100 frames).
OBJECT_STORE_BYTES_PER_SECOND = 2 * SAMPLE_RATE + 4 * 80 * 100
# Input bytes per second of audio, for the storage column: 128 kbit/s MP3, 16 kHz 16-bit WAV.
INPUT_BYTES_PER_SECOND = {"MP3 128k": 16_000, "WAV 16 kHz": 32_000}


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def read_cost(paths: list[Path]) -> tuple[float, float, float, float]:
    """CPU seconds per second of audio, best of three passes: (decode, log-mel of each clip,
    log-mel of the clips joined into one recording, audio seconds).  Each log-mel is padded by
    a 30-s window, as the engine makes it: for short clips that padding is most of the work."""
    best = [float("inf")] * 3
    for _ in range(3):
        decode = mel = seconds = 0.0
        waveforms = []
        for path in paths:
            start = time.process_time()
            waveforms.append(load_audio(path))
            decoded = time.process_time()
            log_mel_frames(waveforms[-1], 80, padding=N_FRAMES * HOP_LENGTH)
            decode += decoded - start
            mel += time.process_time() - decoded
            seconds += len(waveforms[-1]) / SAMPLE_RATE
        start = time.process_time()
        log_mel_frames(np.concatenate(waveforms), 80, padding=N_FRAMES * HOP_LENGTH)
        joined = time.process_time() - start
        best = [min(b, t) for b, t in zip(best, (decode, mel, joined))]
    return best[0] / seconds, best[1] / seconds, best[2] / seconds, seconds


def make_archive(root: Path, repeat: int) -> Archive:
    for copy in range(repeat):
        folder = root / "in" / f"copy{copy}"
        folder.mkdir(parents=True)
        for clip in english_clips():
            os.symlink(clip.path, folder / clip.file)
    return Archive(root / "in", root / "out")


def timed_run(run, archive: Archive, names: list[str], **kwargs) -> tuple[float, float]:
    """(wall seconds, seconds of audio) of one run into an empty OUT."""
    tally = Tally(len(names), show=False)
    start = time.monotonic()
    run(archive=archive, names=names, tally=tally, **kwargs)
    wall = time.monotonic() - start
    assert tally.failed == 0 and tally.transcribed == len(names), "every dev clip should transcribe"
    return wall, tally.audio_seconds


def ray_start_seconds(cpus: int | None, object_store_mb: int | None) -> float:
    import ray

    start = time.monotonic()
    ray.init(
        num_cpus=cpus,
        object_store_memory=None if object_store_mb is None else object_store_mb * 2**20,
        include_dashboard=False,
    )
    started = time.monotonic() - start
    ray.shutdown()
    return started


def projection(gpu_rate: float, cpu_per_audio_second: float, mean_file_minutes: float) -> list[str]:
    audio_seconds = ARCHIVE_HOURS * 3600
    files = audio_seconds / (mean_file_minutes * 60)
    rows = [
        f"10,000 h at {gpu_rate:.0f} s of audio per s per GPU ({audio_seconds / gpu_rate / 3600:.1f} GPU-hours); "
        f"files of {mean_file_minutes:g} min on average ({files:,.0f} files):",
        "",
        "| GPUs | wall time | CPUs for reading | object store traffic | driver rows/s | "
        + " | ".join(f"input ({name})" for name in INPUT_BYTES_PER_SECOND)
        + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in INPUT_BYTES_PER_SECOND) + " |",
    ]
    for gpus in GPU_COUNTS:
        rate = gpu_rate * gpus  # seconds of audio per second, the whole cluster
        wall = audio_seconds / rate
        io = " | ".join(f"{rate * per / 1e6:,.0f} MB/s" for per in INPUT_BYTES_PER_SECOND.values())
        rows.append(
            f"| {gpus} | {wall / 3600:.2f} h | {rate * cpu_per_audio_second:.1f} | "
            f"{rate * OBJECT_STORE_BYTES_PER_SECOND / 1e6:,.0f} MB/s | {files / wall:.1f} | {io} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="copies of the 24 English dev clips")
    parser.add_argument("--skip-ray", action="store_true", help="measure the in-process path only")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--ray-object-store-mb", type=int, default=None)
    parser.add_argument(
        "--gpu-rate", type=float, default=500.0, help="audio s per s per GPU to project from (no --device gpu)"
    )
    parser.add_argument("--mean-file-minutes", type=float, default=30.0, help="for the projection's file count")
    args = parser.parse_args()

    job = Job(args.model, batch_options(language="en"), args.batch_size, device=args.device)
    decode, mel, long_mel, clip_seconds = read_cost([clip.path for clip in english_clips()])
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs visible; load average {os.getloadavg()[0]:.2f}")
    print(f"model {args.model}, device {args.device}, batch size {args.batch_size}, greedy; indicative only\n")
    print(f"CPU per second of audio ({clip_seconds:.0f} s of dev clips, one thread, best of 3):")
    print(f"decode {1000 * decode:.2f} ms + log-mel {1000 * mel:.2f} ms = {1000 * (decode + mel):.2f} ms (clips)")
    print(f"log-mel of the clips joined into one recording: {1000 * long_mel:.2f} ms")
    print(f"(one CPU reads {1 / (decode + long_mel):.0f} s of long recordings per second)\n")

    rows = ["| path | files | audio s | wall s | files/s | audio s per s | overhead per file |", "| --- " * 7 + "|"]
    with tempfile.TemporaryDirectory(prefix="corpus-scale-") as root:
        archive = make_archive(Path(root), args.repeat)
        names = list_audio(archive.in_dir)
        wall, audio = timed_run(lambda **kw: run_in_process(job, **kw), archive, names)
        rows.append(
            f"| in-process | {len(names)} | {audio:.0f} | {wall:.1f} | {len(names) / wall:.2f} | "
            f"{audio / wall:.1f} | - |"
        )
        in_process_rate = audio / wall
        if not args.skip_ray:
            from whisper.corpus.on_ray import run_on_ray

            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            start = ray_start_seconds(args.ray_cpus, args.ray_object_store_mb)
            ray_archive = Archive(archive.in_dir, Path(root) / "out-ray")
            limits = {"cpus": args.ray_cpus, "object_store_mb": args.ray_object_store_mb}
            ray_wall, audio = timed_run(lambda **kw: run_on_ray(job, **kw, **limits), ray_archive, names)
            overhead = (ray_wall - start - wall) / len(names)
            rows.append(
                f"| local Ray (start {start:.1f} s) | {len(names)} | {audio:.0f} | {ray_wall:.1f} | "
                f"{len(names) / ray_wall:.2f} | {audio / ray_wall:.1f} | {1000 * overhead:.0f} ms |"
            )
    print("\n".join(rows))
    gpu_rate = in_process_rate if args.device == "gpu" else args.gpu_rate
    print()
    print("\n".join(projection(gpu_rate, decode + long_mel, args.mean_file_minutes)))


if __name__ == "__main__":
    main()
