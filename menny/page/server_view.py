"""The page's tab for the microphone server (audio_server.py): the input device, Record / Stop
with live feedback, and the clips kept on the server (play, transcribe, delete).

A fragment polls the server: every LIVE_POLL_S while it records, every IDLE_POLL_S otherwise,
so the page notices the server going away and coming back without being touched. Nothing here
depends on the server being up: the library and the other tabs keep working without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from menny.wav import wav_samples
from whisper.model import Whisper

from . import visuals
from .live import LiveTranscript, live_html
from .server_client import InputChoice, ServerClient, ServerError, ServerStatus, ServerUnavailable, start_command
from .transcript_view import clock
from .transcription import TranscriptionSettings
from .ui import library, submit, work_queue

# While recording the page polls the server often enough for a smooth counter and meter;
# otherwise rarely, just to notice the server starting or stopping.
LIVE_POLL_S = 0.5
IDLE_POLL_S = 3.0
METER_FLOOR_DBFS = -60.0
SOURCE_TABS = (":material/mic: Server mic", ":material/language: Browser mic", ":material/upload_file: Upload")
DEVICE_PREFERENCE = "input_device"
SERVER_SOURCE = "server microphone"
CLIPS_SHOWN = 20


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
        _stop_and_transcribe(client, model, settings)
        st.rerun(scope="app")  # the transcription under way shows outside this fragment
    try:
        status = client.status()
    except ServerUnavailable as error:
        _drop_live_transcript()
        st.session_state.pop("devices", None)  # a server that comes back may see other inputs
        st.warning(
            f"{error} Recordings it already made are safe on disk; they appear here when it is back.",
            icon=":material/power_off:",
        )
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
    device = _device_picker(client, status)
    st.caption(f"Records this computer's microphone through the server at {client.url}.")
    if st.button("Record", icon=":material/mic:", type="primary", key="server_record", disabled=not status.device):
        st.session_state["recorder_notice"] = None
        try:
            client.start(device)
        except ServerError as error:
            st.session_state["recorder_notice"] = str(error)
        st.rerun()
    if notice := st.session_state.get("recorder_notice"):
        st.error(notice)
    _clip_list(client, model, settings)


def _stop_and_transcribe(client: ServerClient, model: Whisper | None, settings: TranscriptionSettings) -> None:
    """Stop was pressed: the live transcript gives the model back, the clip is queued."""
    _drop_live_transcript()
    try:
        clip = client.stop()
        data = client.clip_wav(clip.clip_id)
    except ServerError as error:
        st.session_state["recorder_notice"] = f"{error} Whatever was recorded stays on the server (the list below)."
        return
    notice = f"While recording, the server reported: {clip.error}" if clip.error else None
    st.session_state["recorder_notice"] = notice
    submit(f"clip:{clip.clip_id}", data, f"recording {clip.clip_id}.wav", SERVER_SOURCE, model, settings, clip.clip_id)


def _device_picker(client: ServerClient, status: ServerStatus) -> str | None:
    """The input to record from, among those the server sees; the choice is remembered in the
    library, so it is the same on the next visit. None: the server's default."""
    if "devices" not in st.session_state:
        try:
            st.session_state["devices"] = client.devices()
        except ServerError:
            st.session_state["devices"] = []
    devices: list[InputChoice] = st.session_state["devices"]
    if not devices:
        return None
    names = [d.name for d in devices]
    system_default = next((d.name for d in devices if d.is_default), None)
    remembered = library().preference(DEVICE_PREFERENCE)
    default = remembered if remembered in names else (status.device if status.device in names else names[0])
    chosen = st.selectbox(
        "Input device",
        names,
        index=names.index(default),
        format_func=lambda name: f"{name} (system default)" if name == system_default else name,
        key="input_device",
        help="The inputs the microphone server sees; your choice is remembered.",
    )
    if chosen != remembered:
        library().set_preference(DEVICE_PREFERENCE, chosen)
    return chosen


def _clip_list(client: ServerClient, model: Whisper | None, settings: TranscriptionSettings) -> None:
    """The server's clips, newest first: play, transcribe, delete; a transcribed one links to its transcript."""
    try:
        clips = client.clips()
    except ServerError as error:
        st.caption(f"The server's clips could not be listed: {error}")
        return
    if not clips:
        return
    transcribed = library().transcribed_clips([clip.clip_id for clip in clips[:CLIPS_SHOWN]])
    with st.expander(f"Clips on the server ({len(clips)})", icon=":material/library_music:"):
        for clip in clips[:CLIPS_SHOWN]:
            with st.container(horizontal=True, vertical_alignment="center", key=f"menny-server-clip-{clip.clip_id}"):
                st.markdown(f"{clip.created:%Y-%m-%d %H:%M:%S} · {clock(clip.duration_s)}", width="stretch")
                if st.button("Play", icon=":material/play_arrow:", key=f"play-{clip.clip_id}"):
                    st.session_state["playing_clip"] = clip.clip_id
                if uid := transcribed.get(clip.clip_id):
                    if st.button("Transcript", icon=":material/description:", key=f"show-{clip.clip_id}"):
                        st.session_state["library_focus"] = uid
                        st.rerun(scope="app")
                elif st.button("Transcribe", icon=":material/text_fields:", key=f"transcribe-{clip.clip_id}"):
                    _transcribe_kept_clip(client, clip.clip_id, model, settings)
                if st.button("Delete", icon=":material/delete:", key=f"delete-{clip.clip_id}"):
                    try:
                        client.delete_clip(clip.clip_id)
                    except ServerError as error:
                        st.session_state["recorder_notice"] = str(error)
                    st.rerun()
            if st.session_state.get("playing_clip") == clip.clip_id:
                try:
                    st.audio(client.clip_wav(clip.clip_id), format="audio/wav", autoplay=True)
                except ServerError as error:
                    st.error(str(error))
        if len(clips) > CLIPS_SHOWN:
            st.caption(f"The {CLIPS_SHOWN} newest of {len(clips)}; GET /clips on the server lists them all.")


def _transcribe_kept_clip(
    client: ServerClient, clip_id: str, model: Whisper | None, settings: TranscriptionSettings
) -> None:
    try:
        data = client.clip_wav(clip_id)
    except ServerError as error:
        st.session_state["recorder_notice"] = str(error)
        return
    submit(f"clip:{clip_id}", data, f"recording {clip_id}.wav", SERVER_SOURCE, model, settings, clip_id)
    if (outcome := work_queue().outcomes.get(f"clip:{clip_id}")) and outcome.error:
        st.session_state["recorder_notice"] = outcome.error
    st.rerun(scope="app")


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
        st.caption(
            f"Live transcript, {live_transcript.behind_s:.1f} s behind your voice: grey words may still change;"
            " the full transcript replaces it on Stop."
        )
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
