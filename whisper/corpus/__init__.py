"""Transcribe an archive: every audio and video file under a folder, one JSON per file.

`python -m whisper.corpus IN OUT` runs in this process (`in_process`); with `--ray` the
same job runs on a Ray cluster (`on_ray`, imported only then: Ray is optional).  Both
write through `archive`, which makes a run resumable: a file is done when its JSON is.
"""

from ..runtime import configure

# An application, like the command line: its processes (a Ray worker's too, which imports this
# package to run a model holder) are set up for the engine before its modules import MLX.
configure()

from .archive import Archive, list_audio, plan  # noqa: E402
from .in_process import run_in_process  # noqa: E402
from .job import Job, Tally  # noqa: E402

__all__ = ["Archive", "Job", "Tally", "list_audio", "plan", "run_in_process"]
