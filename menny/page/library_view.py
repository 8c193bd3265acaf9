"""The page's transcript library: search, the transcripts (newest first) with their player,
pictures and downloads, and deletion of one or all."""

from __future__ import annotations

import streamlit as st

from whisper.tokenizer import LANGUAGES

from . import visuals
from .library import EXPORT_FORMATS, Transcript
from .transcript_view import clock, transcript_html
from .ui import library, model_label

SHOWN = 20  # the newest; searching finds the others


def library_section() -> None:
    kept = library()
    heading, clear = st.columns([4, 1], vertical_alignment="bottom")
    heading.subheader("Transcripts")
    count = kept.count()
    if count:
        with clear.container(horizontal_alignment="right"), st.popover("Delete all", icon=":material/delete:"):
            st.write(f"Delete all {count} transcript(s) and their audio from this computer?")
            if st.button("Delete them all", type="primary", key="delete_all"):
                kept.delete_all()
                st.rerun()
    if not count:
        st.info("Nothing transcribed yet: record something or upload a file above.", icon=":material/headphones:")
        return
    if focus := st.session_state.get("library_focus"):
        transcript = kept.get(focus)
        if st.button("Show all transcripts", icon=":material/list:", key="library_show_all") or transcript is None:
            del st.session_state["library_focus"]
            st.rerun()
        transcript_view(transcript)
        return
    search = st.text_input(
        "Search the transcripts",
        key="library_search",
        placeholder="Words that were said…",
        icon=":material/search:",
        label_visibility="collapsed",
    )
    found = kept.transcripts(search, limit=SHOWN)
    if search and not found:
        st.info(f"No transcript holds “{search}”.", icon=":material/search_off:")
    elif not search and count > SHOWN:
        st.caption(f"The {SHOWN} newest of {count} transcripts; search to find the others.")
    for transcript in found:
        transcript_view(transcript)


def transcript_view(transcript: Transcript) -> None:
    with st.container(border=True, key=f"menny-clip-{transcript.uid}"):
        language = LANGUAGES.get(transcript.language, transcript.language).title()
        title, delete = st.columns([6, 1], vertical_alignment="center")
        title.markdown(f"**{transcript.name}**")
        if delete.container(horizontal_alignment="right").button(
            "Delete", icon=":material/delete:", key=f"delete-{transcript.uid}"
        ):
            library().delete(transcript.uid)
            st.rerun()
        cancelled = (
            f" · cancelled at {clock(transcript.cancelled_at_s)}" if transcript.cancelled_at_s is not None else ""
        )
        st.caption(
            f"{transcript.source} · {clock(transcript.duration_s)} · language: {language} · "
            f"model {model_label(transcript.model)} · transcribed in {transcript.transcribe_s:.1f} s · "
            f"{transcript.created:%Y-%m-%d %H:%M:%S}{cancelled}"
        )
        try:
            wav = transcript.wav()
        except OSError:
            st.warning("Its audio file is gone; the text is still here.", icon=":material/music_off:")
            wav = None
        if wav is not None:
            st.audio(wav, format="audio/wav")
        st.html(transcript_html(transcript.result), unsafe_allow_javascript=True)
        if wav is not None:
            waveform, spectrogram = visuals.clip_pictures(transcript.audio, transcript.n_mels)
            wave, spectrum = st.columns(2)
            wave.image(waveform, width="stretch")
            spectrum.image(spectrogram, width="stretch")
        with st.container(horizontal=True):
            for fmt, mime in EXPORT_FORMATS.items():
                st.download_button(
                    fmt.upper(),
                    transcript.export(fmt),
                    file_name=transcript.export_name(fmt),
                    mime=mime,
                    icon=":material/download:",
                    on_click="ignore",
                    key=f"download-{transcript.uid}-{fmt}",
                )
