"""The corpus on a Ray cluster, through Ray Data.

Files are read and turned into log-mel on CPU workers (Ray tasks, one file per block);
a pool of model holders (Ray actors: one per GPU where the cluster has GPUs, else one per
spare CPU) transcribes batches of them with the batched engine and writes each file's
outputs itself; the driver only counts, shows progress and records failures.

Faults: Ray Data restarts a holder that dies and hands its unfinished batch to a holder
again (its actors' defaults: max_restarts=-1, max_task_retries=-1); the holder skips files
whose JSON a dead predecessor already wrote, so every file ends up transcribed once in OUT.
A driver that dies takes the job with it; run it again and it resumes from OUT.
IN and OUT must be at the same paths on every node (a shared disk).

Needs Ray (requirements-corpus.txt); `whisper` imports this module only for `--ray`.
"""

from __future__ import annotations

import os

import numpy as np
import ray
import ray.data
from ray.data import ActorPoolStrategy

from ..audio import SAMPLE_RATE, AudioError
from ..batch import transcribe_stream
from ..models import model_dims
from ..transcribe import Features, audio_features
from .archive import Archive
from .job import Job, Tally

# Input blocks at most: one file per block keeps a block's decoded audio small however long
# the recordings (64 kB per second of audio); past this, short files share blocks.
MAX_BLOCKS = 20_000
# What reading an hour-long recording takes: its waveform and log-mel, 64 kB per second each.
READ_MEMORY = 512 * 2**20
# Files handed to a holder at a time, in batches of the engine's batch size: enough that a
# batch stays full while long and short files finish at different times.
BATCHES_PER_CALL = 4


def run_on_ray(
    job: Job,
    archive: Archive,
    names: list[str],
    tally: Tally,
    *,
    address: str | None = None,
    cpus: int | None = None,
    object_store_mb: int | None = None,
    holders: int | None = None,
) -> None:
    """Transcribe `names` on the Ray cluster at `address`, or on a local cluster started for
    this run (with `cpus` and `object_store_mb`) when `address` is None."""
    # Menny keeps everything on this machine: Ray's usage statistics stay off.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        object_store = None if object_store_mb is None else object_store_mb * 2**20
        ray.init(num_cpus=cpus, object_store_memory=object_store, include_dashboard=False)
    else:
        ray.init(address=address)
    try:
        _run(job, archive, names, tally, holders)
    finally:
        ray.shutdown()  # a local cluster stops with it; a joined one is only left


def _run(job: Job, archive: Archive, names: list[str], tally: Tally, holders: int | None) -> None:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the tally is the progress bar
    gpus = 0 if job.device == "cpu" else int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Without GPUs, one CPU stays free for reading files, or the holders would starve them.
    size = holders or gpus or max(1, cpus - 1)
    n_mels = model_dims(job.model).n_mels
    files = ray.data.from_items([{"audio": name} for name in names], override_num_blocks=min(len(names), MAX_BLOCKS))
    # Memory is reserved for each read so that a node is not handed more than it can hold; being
    # different from the holders' needs, it also keeps Ray Data from fusing reads into holders.
    read_kwargs = {"archive": archive, "n_mels": n_mels}
    features = files.map(read_features, fn_kwargs=read_kwargs, num_cpus=1, memory=READ_MEMORY)
    transcribed = features.map_batches(
        ModelHolder,
        fn_constructor_kwargs={"job": job, "archive": archive},
        batch_size=BATCHES_PER_CALL * job.batch_size,
        compute=ActorPoolStrategy(size=size),
        num_cpus=1,
        num_gpus=1 if gpus else 0,
    )
    for rows in transcribed.iter_batches(batch_size=None, batch_format="numpy"):
        for name, seconds, error in zip(rows["audio"], rows["seconds"], rows["error"]):
            if error:
                archive.record_failure(str(name), str(error))
                tally.failed_one()
            else:
                tally.transcribed_one(float(seconds))


def read_features(row: dict, archive: Archive, n_mels: int) -> dict:
    """One file's waveform and log-mel (a Ray task on a CPU), or why it cannot be read."""
    name = row["audio"]
    try:
        waveform, mel = audio_features(archive.source(name), n_mels)
    except AudioError as error:
        empty_mel = np.zeros((0, n_mels), np.float32)
        return {"audio": name, "waveform": np.zeros(0, np.int16), "mel": empty_mel, "error": str(error)}
    # The samples came from 16-bit integers (load_audio): carried as such, exactly, in half the space.
    return {"audio": name, "waveform": (waveform * 32768).astype(np.int16), "mel": mel, "error": ""}


class ModelHolder:
    """A Ray actor holding one model: transcribes the files of each batch and writes them."""

    def __init__(self, job: Job, archive: Archive):
        self.job = job
        self.archive = archive
        self.model = job.load_model()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [str(name) for name in rows["audio"]]
        # A retried batch: files a holder that died had finished are not transcribed again.
        todo = [i for i, name in enumerate(names) if not rows["error"][i] and not self.archive.is_done(name)]
        features = (Features(rows["waveform"][i].astype(np.float32) / 32768, rows["mel"][i]) for i in todo)
        job = self.job
        for index, finished in transcribe_stream(self.model, features, job.options, batch_size=job.batch_size):
            self.archive.write(names[todo[index]], finished.result(), finished.duration)
        return {
            "audio": np.array(names),
            "seconds": np.array([len(waveform) / SAMPLE_RATE for waveform in rows["waveform"]]),
            "error": rows["error"],
        }
