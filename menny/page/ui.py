"""Streamlit pieces of the page: the header, the settings, the upload and browser-microphone
tabs, and the transcription under way (the server's tab: server_view.py; the library:
library_view.py).

The page (menny_the_sonic_whisperer.py) calls these top to bottom. Anything that can go wrong
with a person's input ends as a message on the page that says what to do, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import streamlit as st

from whisper.model import Whisper
from whisper.models import available_models, local_models
from whisper.models import load_model as load_whisper_model
from whisper.tokenizer import LANGUAGES

from . import model_download
from .library import Library, LibraryTooNew, default_folder
from .server_client import default_url
from .transcript_view import STYLE, clock, transcript_html
from .transcription import Outcome, TranscriptionSettings, WorkQueue

log = logging.getLogger("menny.page")

AVATAR = Path(__file__).resolve().parents[2] / "images" / "menny.svg"
BUNDLED_MODELS = ("tiny.en", "base")
WORK_POLL_S = 0.5  # how often the transcription under way is redrawn (and its end noticed)
AUTO_LANGUAGE = "auto"
HEADER_STYLE = "<style>@media (max-width: 640px) { .st-key-menny-header h1 { font-size: 1.75rem; } }</style>"


def default_model() -> str:
    """MENNY_MODEL, else base (tests pick tiny.en to stay fast)."""
    return os.environ.get("MENNY_MODEL", "base")


@st.cache_resource(show_spinner=False)
def _library(folder: str) -> Library:
    return Library(Path(folder))


def library() -> Library:
    """The transcript library in the user's data folder, opened once per process; if it cannot
    be opened, a message says why and the page stops there."""
    try:
        return _library(str(default_folder()))
    except (LibraryTooNew, OSError, sqlite3.Error) as error:
        st.error(f"The transcript library could not be opened: {error}", icon=":material/database:")
        st.stop()


def work_queue() -> WorkQueue:
    """This page session's transcriptions, one after another."""
    return st.session_state.setdefault("work", WorkQueue(library()))


def header() -> None:
    st.html(STYLE + HEADER_STYLE)
    # Side by side at any width (columns would stack on a phone and push the tabs down).
    with st.container(horizontal=True, vertical_alignment="center", key="menny-header"):
        st.image(str(AVATAR), width=96)
        with st.container(width="stretch"):
            st.title("Menny, the Sonic Whisperer")
            st.caption(
                "Speech to text on this computer: record, or drop in any audio or video file. "
                "Nothing leaves the machine."
            )


# --- settings and the model -----------------------------------------------------------------


@st.cache_resource(show_spinner=False, max_entries=2)
def _cached_model(name: str) -> Whisper:
    return load_whisper_model(name)


def load_model(name: str) -> Whisper | None:
    """The model, loaded once per process; None while it is downloaded (a bar shows how far) and,
    with a message, when it cannot be loaded."""
    try:
        download = model_download.download_of(name)
        if download is not None:
            if not download.finished:
                st.fragment(_download_view, run_every=model_download.POLL_S)(download)
                return None
            model_download.take(download)
        with st.spinner(f"Loading {model_label(name)} (the first time it is converted, which can take minutes)…"):
            return _cached_model(name)
    except (FileNotFoundError, ValueError, OSError) as error:
        st.error(
            f"The model “{name}” could not be loaded: {error}. "
            f"Choose another in the sidebar ({', '.join(BUNDLED_MODELS)} are always there), or type a "
            "model folder, an openai-whisper .pt file or a Hugging Face repo id; "
            f"`.venv/bin/python -m whisper.prepare {name}` gets one ready from the command line, "
            "showing the download's progress."
        )
        return None


def _download_view(download: model_download.ModelDownload) -> None:
    if download.finished:
        st.rerun(scope="app")  # the whole page loads the model, or says why it cannot
    fraction, text = download.progress.status()
    st.progress(fraction, text=text)


def model_label(name: str) -> str:
    if name in available_models():
        return name
    if Path(name).expanduser().exists():
        return f"{Path(name).name} (local)"
    return f"{name} (Hugging Face)"


def sidebar_settings() -> tuple[TranscriptionSettings, Whisper | None, str]:
    """The sidebar: model, language, task, word timings, beam size, server URL."""
    with st.sidebar:
        st.header("Settings")
        options = list(dict.fromkeys([*local_models(), default_model()]))
        model_name = st.selectbox(
            "Model",
            options,
            index=options.index(default_model()),
            format_func=model_label,
            accept_new_options=True,
            help="tiny.en is fastest (English only); base knows 99 languages. Listed: the bundled "
            "models and those already on this computer. To add one, type its name (small, medium, "
            "large-v3, turbo, distil-large-v3, …: downloaded from Hugging Face once), a model folder, "
            "an openai-whisper .pt file, or a Hugging Face repo id.",
        )
        model = load_model(model_name)
        multilingual = model is None or model.is_multilingual
        language = st.selectbox(
            "Language",
            [AUTO_LANGUAGE, *sorted(list(LANGUAGES)[: model.num_languages if model else None], key=LANGUAGES.get)],
            format_func=lambda code: (
                "Detect automatically" if code == AUTO_LANGUAGE else f"{LANGUAGES[code].title()} ({code})"
            ),
            disabled=not multilingual,
            help=None if multilingual else "This model knows English only.",
        )
        task = st.radio(
            "Task",
            ["transcribe", "translate"],
            format_func=lambda t: "Transcribe" if t == "transcribe" else "Translate to English",
            horizontal=True,
            disabled=not multilingual,
        )
        word_timestamps = st.toggle(
            "Word timings", value=True, help="Hover a word for its time; click it to play from there."
        )
        beam_size = st.number_input(
            "Beam size", min_value=1, max_value=10, value=1, help="1: greedy, fastest. 5: can be more accurate."
        )
        st.divider()
        server_url = st.text_input("Microphone server URL", value=default_url())
    settings = TranscriptionSettings(
        model=model_name,
        language=language if multilingual and language != AUTO_LANGUAGE else None,
        task=task if multilingual else "transcribe",
        word_timestamps=word_timestamps,
        beam_size=int(beam_size),
    )
    return settings, model, server_url


# --- transcribing ---------------------------------------------------------------------------


def submit(
    key: str, data: bytes, name: str, source: str, model: Whisper | None, settings: TranscriptionSettings,
    clip_id: str | None = None,
) -> None:
    """Queue one clip for transcription; `key` names it for its message."""
    work = work_queue()
    if model is None:
        work.outcomes[key] = Outcome(f"“{name}” was not transcribed: no model is loaded (see the message above).", None)
        return
    work.submit(key, model=model, settings=settings, data=data, name=name, source=source, clip_id=clip_id)


def _transcribe_new(files: list, source: str, model: Whisper | None, settings: TranscriptionSettings) -> None:
    """Queue each file not seen before; keep each one's error beside it until it is removed."""
    seen: set[str] = st.session_state.setdefault(f"seen-{source}", set())
    work = work_queue()
    for file in files:
        key = f"{source}:{file.file_id}"
        if key not in seen:
            seen.add(key)
            submit(key, file.getvalue(), file.name, source, model, settings)
        if (outcome := work.outcomes.get(key)) and outcome.error:
            st.error(outcome.error)


def work_view() -> None:
    """The transcription under way: its segments as they come, how far it is, and Cancel.
    Redrawn every WORK_POLL_S while there is work; the whole page once it is done."""
    st.fragment(_work_view, run_every=WORK_POLL_S if work_queue().busy else None)()


def _work_view() -> None:
    work = work_queue()
    work.poll()
    job = work.current
    if job is None:
        if st.session_state.pop("work_shown", False):
            st.rerun(scope="app")  # show the new transcript in the library
        return
    st.session_state["work_shown"] = True
    with st.container(border=True, key="menny-work"):
        st.markdown(f"**Transcribing “{job.name}”**" + (f" · {work.pending} more waiting" if work.pending else ""))
        if job.waiting:
            progress, text = 0.0, f"Waiting for another transcription to finish · {job.elapsed_s:.0f} s"
        elif job.total_s is None:
            progress, text = 0.0, f"Reading the audio · {job.elapsed_s:.0f} s"
        else:
            progress = min(job.done_s / job.total_s, 1.0) if job.total_s else 1.0
            text = f"{clock(job.done_s)} of {clock(job.total_s)} transcribed · {job.elapsed_s:.0f} s"
        st.progress(progress, text=text)
        if segments := job.segments:
            st.html(transcript_html({"segments": segments}, script=False))
        if job.cancelled:
            st.caption("Cancelling after the current 30-second window; what is done is kept.")
        elif st.button("Cancel", icon=":material/cancel:", key="cancel_work"):
            work.cancel()
            st.rerun()


def upload_tab(model: Whisper | None, settings: TranscriptionSettings) -> None:
    files = st.file_uploader(
        "Audio or video files (WAV, FLAC, MP3, M4A, OGG, WebM, MP4, …): each is transcribed in turn",
        accept_multiple_files=True,
        key="uploads",
    )
    _transcribe_new(files or [], "upload", model, settings)


def browser_tab(model: Whisper | None, settings: TranscriptionSettings) -> None:
    st.caption("Uses this browser's microphone: the right choice when the page is open on another computer.")
    clip = st.audio_input("Record in the browser", key="browser_mic")
    _transcribe_new([clip] if clip else [], "browser microphone", model, settings)
