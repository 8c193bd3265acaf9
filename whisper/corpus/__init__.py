"""Transcribe an archive: every audio and video file under a folder, one JSON per file.

`python -m whisper.corpus IN OUT` runs in this process (`in_process`); with `--ray` the
same job runs on a Ray cluster (`on_ray`, imported only then: Ray is optional).  Both
write through `archive`, which makes a run resumable: a file is done when its JSON is.
"""

from .archive import Archive, list_audio, plan
from .in_process import run_in_process
from .job import Job, Tally

__all__ = ["Archive", "Job", "Tally", "list_audio", "plan", "run_in_process"]
