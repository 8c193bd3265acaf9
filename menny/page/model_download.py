"""A model fetched from Hugging Face and converted while the page shows how far it is.

huggingface_hub downloads in worker threads of its own and reports through a tqdm class, and
Streamlit calls work only in the page's script thread: so the download and the conversion run in
a thread of their own, the hub's bars count into a `DownloadProgress` under a lock, and the page
reads it every POLL_S. One download per model runs in the process, whichever session asked.
"""

from __future__ import annotations

import io
import threading

from tqdm.auto import tqdm

from whisper.models import hub_repo, needs_download, prepare

POLL_S = 0.25  # how often the page redraws a download's bar


class _Nowhere(io.TextIOBase):
    """Where the hub's bars write their text: the page draws the bar itself."""

    def write(self, text: str) -> int:
        return len(text)


def _size(size: float) -> str:
    """586 B, 8 MB, 412 MB, 1.62 GB."""
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}"
        size /= 1000
    return f"{size:.2f} GB"


def _shows_total(bar: tqdm) -> bool:
    # huggingface_hub 1.23+ adds a bar of the bytes received, whose total it leaves out of its
    # text (compression and deduplication make it unknowable); the bar of the bytes written
    # beside it has the files' sizes as its total.
    return bar.bar_format is None or "total" in bar.bar_format


class DownloadProgress:
    """How far the download and conversion of one Hugging Face repo are: fed by huggingface_hub's
    threads through the bars of `bar_class()`, read by the page through `status()`."""

    def __init__(self, repo: str) -> None:
        self.repo = repo
        self._lock = threading.Lock()
        self._bars: list[tqdm] = []
        self._bytes_fraction = 0.0  # the last seen while bytes were arriving

    def bar_class(self) -> type[tqdm]:
        """A tqdm class for `snapshot_download` whose bars count into this record."""
        record = self

        class Bar(tqdm):
            def __init__(self, *args, **kwargs) -> None:
                kwargs.pop("name", None)  # huggingface_hub 1.x names its bars; tqdm refuses the keyword
                # Enabled whatever the hub decides from its settings and the terminal: the page shows it.
                super().__init__(*args, **{**kwargs, "disable": False, "file": _Nowhere()})
                with record._lock:
                    record._bars.append(self)

            def update(self, n: float | None = 1) -> bool | None:
                with record._lock:  # the hub's download threads add to one bar at once
                    return super().update(n)

        return Bar

    def status(self) -> tuple[float, str]:
        """The fraction done and what is happening, for the page's bar."""
        with self._lock:
            bars = [bar for bar in self._bars if _shows_total(bar)]
            counts_bytes = any(bar.unit == "B" for bar in bars)
            arriving = next(((bar.n, bar.total) for bar in bars if bar.unit == "B" and bar.n < (bar.total or 0)), None)
            files = next(((bar.n, bar.total) for bar in bars if bar.unit != "B" and bar.total), None)
            if arriving is not None:
                self._bytes_fraction = arriving[0] / arriving[1]
            bytes_fraction = self._bytes_fraction
        if files is not None and files[0] >= files[1]:
            return 1.0, f"Converting {self.repo} for this computer (only this once)…"
        if arriving is not None:
            done, total = arriving
            return bytes_fraction, f"Downloading {self.repo}: {_size(done)} of {_size(total)}"
        if files is not None:
            # With no bytes arriving, the hub's byte total is that of the files begun so far (a small file
            # can be done before a big one starts): the bar holds where the bytes left it, not at that total.
            fraction = bytes_fraction if counts_bytes else files[0] / files[1]
            return fraction, f"Downloading {self.repo}: {files[0]:.0f} of {files[1]:.0f} files"
        return 0.0, f"Asking Hugging Face for {self.repo}…"


class ModelDownload:
    """`whisper.models.prepare(name)` in a thread of its own, reporting into `progress`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.progress = DownloadProgress(hub_repo(name) or name)
        self.error: Exception | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"menny-download-{name}", daemon=True)

    def start(self) -> ModelDownload:
        self._thread.start()
        return self

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def _run(self) -> None:
        try:
            prepare(self.name, download_progress=self.progress.bar_class())
        except Exception as error:  # noqa: BLE001 - the page shows it, or raises it in its own thread
            self.error = error
        finally:
            self._done.set()


_downloads: dict[str, ModelDownload] = {}
_downloads_lock = threading.Lock()


def download_of(name: str) -> ModelDownload | None:
    """The download of model `name`: the one under way or finished and not yet taken, else a new
    one when the model is not on this computer; None when it is."""
    with _downloads_lock:
        download = _downloads.get(name)
        if download is None and needs_download(name):
            download = _downloads[name] = ModelDownload(name).start()
        return download


def take(download: ModelDownload) -> None:
    """Forget a finished download, so that the model's next request starts afresh, and raise its
    error if it failed."""
    with _downloads_lock:
        if _downloads.get(download.name) is download:
            del _downloads[download.name]
    if download.error is not None:
        raise download.error
