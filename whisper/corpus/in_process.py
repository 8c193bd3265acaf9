"""The corpus in this process: one model, files streamed through the batched engine."""

from __future__ import annotations

from ..audio import AudioError
from ..batch import transcribe_stream
from .archive import Archive
from .job import Job, Tally


def run_in_process(job: Job, archive: Archive, names: list[str], tally: Tally) -> None:
    """Transcribe `names` (relative to the archive's input) with one model, writing each
    file's outputs as it finishes; an unreadable file is recorded and the rest go on."""
    model = job.load_model()
    sources = (archive.source(name) for name in names)
    for index, finished in transcribe_stream(model, sources, job.options, batch_size=job.batch_size):
        if isinstance(finished, AudioError):
            archive.record_failure(names[index], str(finished))
            tally.failed_one()
        else:
            archive.write(names[index], finished.result(), finished.duration)
            tally.transcribed_one(finished.duration)
