"""Streamlit pieces of the page: settings, the three ways in, the result view.

The page (menny_the_sonic_whisperer.py) calls these top to bottom. Anything that can go wrong
with a person's input ends as a message on the page that says what to do, never a traceback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from whisper.audio import SAMPLE_RATE
from whisper.model import Whisper
from whisper.models import available_models
from whisper.models import load_model as load_whisper_model
from whisper.tokenizer import LANGUAGES

from . import visuals
from .live import LiveTranscript, live_html
from .server_client import (
    SavedClip,
    ServerClient,
    ServerError,
    ServerStatus,
    ServerUnavailable,
    default_url,
    start_command,
)
from .session import EXPORT_FORMATS, ClipResult, History, wav_samples
from .transcript_view import STYLE, clock, transcript_html
from .transcription import ClipError, TranscriptionSettings, decode, transcribe_clip

log = logging.getLogger("menny.page")

AVATAR = Path(__file__).resolve().parents[2] / "images" / "menny.svg"
BUNDLED_MODELS = ("tiny.en", "base")
# While recording the page polls the server often enough for a smooth counter and meter;
# otherwise rarely, just to notice the server starting or stopping.
LIVE_POLL_S = 0.5
IDLE_POLL_S = 3.0
METER_FLOOR_DBFS = -60.0
AUTO_LANGUAGE = "auto"
SOURCE_TABS = (":material/mic: Server mic", ":material/language: Browser mic", ":material/upload_file: Upload")
HEADER_STYLE = "<style>@media (max-width: 640px) { .st-key-menny-header h1 { font-size: 1.75rem; } }</style>"


def default_model() -> str:
    """MENNY_MODEL, else base (tests pick tiny.en to stay fast)."""
    return os.environ.get("MENNY_MODEL", "base")


def session_history() -> History:
    return st.session_state.setdefault("history", History())


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
    """The model, loaded once per process; None (with a message) when it cannot be loaded."""
    try:
        with st.spinner(f"Loading the {name} model (only the first time)…"):
            return _cached_model(name)
    except (FileNotFoundError, ValueError, OSError) as error:
        st.error(
            f"The model “{name}” could not be loaded: {error}. "
            f"Choose one of {', '.join(BUNDLED_MODELS)} in the sidebar, or prepare it once with "
            f"`.venv/bin/python -m whisper.prepare {name}`."
        )
        return None


def _model_label(name: str) -> str:
    return name if name in BUNDLED_MODELS else f"{Path(name).name} (local)"


def sidebar_settings() -> tuple[TranscriptionSettings, Whisper | None, str]:
    """The sidebar: model, language, task, word timings, beam size, server URL."""
    with st.sidebar:
        st.header("Settings")
        options = list(dict.fromkeys([*available_models(), default_model()]))
        model_name = st.selectbox(
            "Model",
            options,
            index=options.index(default_model()),
            format_func=_model_label,
            accept_new_options=True,
            help="tiny.en is fastest (English only); base knows 99 languages. "
            "Type a model folder path to use another local model.",
        )
        model = load_model(model_name)
        multilingual = model is None or model.is_multilingual
        language = st.selectbox(
            "Language",
            [AUTO_LANGUAGE, *sorted(LANGUAGES, key=LANGUAGES.get)],
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


def transcribe_and_keep(
    data: bytes, name: str, source: str, model: Whisper | None, settings: TranscriptionSettings
) -> str | None:
    """Decode and transcribe one clip into the history, showing progress. An error message, or None."""
    if model is None:
        return f"“{name}” was not transcribed: no model is loaded (see the message above)."
    with st.status(f"Transcribing “{name}”…", expanded=True) as status:
        try:
            audio = decode(data, name)
            bar = st.progress(0.0, text=f"0:00.0 of {clock(audio.size / SAMPLE_RATE)}")

            def progress(done: float, total: float) -> None:
                bar.progress(min(done / total, 1.0) if total else 1.0, text=f"{clock(done)} of {clock(total)}")

            record = transcribe_clip(model, audio, name=name, source=source, settings=settings, progress=progress)
        except ClipError as error:
            status.update(label=f"“{name}” could not be transcribed", state="error", expanded=False)
            return str(error)
        except Exception as error:  # the page must stay up; the log keeps the traceback
            log.exception("transcribing %s failed", name)
            status.update(label=f"“{name}” could not be transcribed", state="error", expanded=False)
            return (
                f"Something went wrong while transcribing “{name}” ({error.__class__.__name__}: {error}). "
                "Try again, or choose another model in the sidebar."
            )
        status.update(label=f"“{name}” transcribed in {record.transcribe_s:.1f} s", state="complete", expanded=False)
    session_history().add(record)
    return None


def _transcribe_new(files: list, source: str, model: Whisper | None, settings: TranscriptionSettings) -> None:
    """Transcribe each file not seen before, in turn; keep each one's error beside it until it is removed."""
    seen: dict[str, str | None] = st.session_state.setdefault(f"seen-{source}", {})
    for file in files:
        if file.file_id not in seen:
            seen[file.file_id] = transcribe_and_keep(file.getvalue(), file.name, source, model, settings)
        if seen[file.file_id]:
            st.error(seen[file.file_id])


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


# --- the server's microphone ----------------------------------------------------------------


def server_status(client: ServerClient) -> ServerStatus | None:
    """The microphone server's status, or None when it does not answer."""
    try:
        return client.status()
    except ServerError:
        return None


def source_tabs(server_up: bool) -> Sequence[DeltaGenerator]:
    """The three ways in. A session that opens while the server is down starts on the browser's
    microphone (the tabs do not rerun the page, so a click never interrupts a transcription)."""
    first = st.session_state.setdefault("first_tab", SOURCE_TABS[0] if server_up else SOURCE_TABS[1])
    return st.tabs(SOURCE_TABS, default=first)


def server_tab(
    client: ServerClient, status: ServerStatus | None, model: Whisper | None, settings: TranscriptionSettings
) -> None:
    """Record / Stop through audio_server.py, with live feedback polled by a fragment."""
    live = status is not None and status.recording
    st.fragment(_recorder, run_every=LIVE_POLL_S if live else IDLE_POLL_S)(client, live, model, settings)


def _recorder(client: ServerClient, live: bool, model: Whisper | None, settings: TranscriptionSettings) -> None:
    if st.session_state.get("server_stop"):
        # Stop was pressed: straight to the transcript; redrawing the live view would delay it.
        try:
            st.session_state["pending_clip"] = client.stop()
        except ServerError as error:
            st.session_state["recorder_notice"] = f"{error} Whatever was recorded stays on the server."
    if clip := st.session_state.get("pending_clip"):
        # Kept until its transcript is in, so a rerun that interrupts the transcription resumes it.
        if live_transcript := st.session_state.get("live_transcript"):
            # Shown until the final transcript replaces it; stopped first, to free the model.
            st.html(live_html(live_transcript.stop(), live_transcript.error))
        st.session_state["recorder_notice"] = _transcribe_server_clip(client, clip, model, settings)
        del st.session_state["pending_clip"]
        _drop_live_transcript()
        st.rerun()
    try:
        status = client.status()
    except ServerUnavailable as error:
        st.warning(str(error), icon=":material/power_off:")
        st.code(start_command(client.url), language="bash", wrap_lines=True)
        if live:
            st.rerun()  # the server went away mid-recording: back to slow polling
        return
    except ServerError as error:
        st.error(str(error))
        return
    if status.recording != live:
        st.rerun()  # started or stopped elsewhere (another tab): switch how often to poll
    if status.recording:
        _live_view(client, status, model, settings)
        return
    _drop_live_transcript()  # stopped elsewhere (another tab, the length limit)
    if status.error:
        st.warning(status.error, icon=":material/mic_off:")
    st.caption(
        f"Records this computer's microphone ({status.device or 'none found'}) through the server "
        f"at {client.url}; {status.clip_count} clip(s) kept there."
    )
    if st.button("Record", icon=":material/mic:", type="primary", key="server_record", disabled=not status.device):
        st.session_state["recorder_notice"] = None
        try:
            client.start()
        except ServerError as error:
            st.session_state["recorder_notice"] = str(error)
        st.rerun()
    if notice := st.session_state.get("recorder_notice"):
        st.error(notice)


def _live_view(
    client: ServerClient, status: ServerStatus, model: Whisper | None, settings: TranscriptionSettings
) -> None:
    """Elapsed time, a level meter, Stop, the waveform and the words recorded so far."""
    elapsed, meter = st.columns([1, 3], vertical_alignment="center")
    elapsed.metric("Recording", clock(status.elapsed_s))
    level = max(status.level_dbfs, METER_FLOOR_DBFS)
    meter.progress(
        (level - METER_FLOOR_DBFS) / -METER_FLOOR_DBFS,
        text=f"Level {status.level_dbfs:.0f} dBFS" if status.level_dbfs > METER_FLOOR_DBFS else "Level: silence",
    )
    st.button("Stop", icon=":material/stop_circle:", type="primary", key="server_stop")
    if live_transcript := _live_transcript(client, status, model, settings):
        st.caption("Live transcript: grey words may still change; the full transcript replaces it on Stop.")
        st.html(live_html(live_transcript.state, live_transcript.error))
    if png := _live_waveform(client, status):
        st.image(png, width="stretch")


def _live_transcript(
    client: ServerClient, status: ServerStatus, model: Whisper | None, settings: TranscriptionSettings
) -> LiveTranscript | None:
    """The live transcript of the recording under way, started on its first poll."""
    live_transcript = st.session_state.get("live_transcript")
    if live_transcript is None or live_transcript.clip_id != status.clip_id:
        _drop_live_transcript()
        if model is None or status.clip_id is None:
            return None
        live_transcript = st.session_state["live_transcript"] = LiveTranscript(client, status.clip_id, model, settings)
    return live_transcript


def _drop_live_transcript() -> None:
    if live_transcript := st.session_state.pop("live_transcript", None):
        live_transcript.stop()


def _live_waveform(client: ServerClient, status: ServerStatus) -> bytes | None:
    """The picture of the recording so far. Redrawn less often as it grows (every 1/60 of its
    length), since each redraw fetches all of it: the cost per second stays flat."""
    clip_id, drawn_at, png = st.session_state.get("live_waveform", (None, 0.0, None))
    if clip_id == status.clip_id and status.elapsed_s - drawn_at < max(LIVE_POLL_S, status.elapsed_s / 60):
        return png
    try:
        wav = client.partial_wav(status.clip_id)
        audio = wav_samples(wav) if wav else None
    except (ServerError, ValueError):
        audio = None
    if audio is None or not audio.size:
        return png if clip_id == status.clip_id else None  # a poll that misses: the next one redraws
    png = visuals.figure_png(visuals.waveform_figure(audio, title="Recorded so far", size=visuals.LIVE_FIGURE_SIZE))
    st.session_state["live_waveform"] = (status.clip_id, status.elapsed_s, png)
    return png


def _transcribe_server_clip(
    client: ServerClient, clip: SavedClip, model: Whisper | None, settings: TranscriptionSettings
) -> str | None:
    try:
        data = client.clip_wav(clip.clip_id)
    except ServerError as error:
        return f"{error} The recording stays on the server as clip {clip.clip_id}."
    problem = transcribe_and_keep(data, f"recording {clip.clip_id}.wav", "server microphone", model, settings)
    if clip.error:
        problem = f"{problem or ''} While recording, the server reported: {clip.error}".strip()
    return problem


# --- results --------------------------------------------------------------------------------


def history_section() -> None:
    history = session_history()
    heading, clear = st.columns([4, 1], vertical_alignment="bottom")
    heading.subheader("Transcripts")
    if len(history) and clear.container(horizontal_alignment="right").button(
        "Clear all", icon=":material/delete:", key="clear_history"
    ):
        history.clear()
    if not len(history):
        st.info("Nothing transcribed yet: record something or upload a file above.", icon=":material/headphones:")
    for record in history:
        result_view(record)


def result_view(record: ClipResult) -> None:
    with st.container(border=True, key=f"menny-clip-{record.uid}"):
        language = LANGUAGES.get(record.language, record.language).title()
        st.markdown(f"**{record.name}**")
        st.caption(
            f"{record.source} · {clock(record.duration_s)} · language: {language} · "
            f"model {_model_label(record.model)} · transcribed in {record.transcribe_s:.1f} s · "
            f"{record.created:%H:%M:%S}"
        )
        st.audio(record.wav, format="audio/wav")
        st.html(transcript_html(record.result), unsafe_allow_javascript=True)
        wave, spectrum = st.columns(2)
        wave.image(record.waveform_png, width="stretch")
        spectrum.image(record.spectrogram_png, width="stretch")
        with st.container(horizontal=True):
            for fmt, mime in EXPORT_FORMATS.items():
                st.download_button(
                    fmt.upper(),
                    record.export(fmt),
                    file_name=record.export_name(fmt),
                    mime=mime,
                    icon=":material/download:",
                    on_click="ignore",
                    key=f"download-{record.uid}-{fmt}",
                )
