"""The page's live transcript without a browser: following a real microphone server while the
virtual microphone speaks, reading a growing WAV, the HTML it shows.
(tests/test_page_browser.py watches it in a real browser.)"""

from __future__ import annotations

from collections.abc import Callable

from speech import clip, model, wer
from virtual_mic import ServerProcess, VirtualMic, wait_for

from menny.page.live import LiveTranscript, live_html
from menny.page.server_client import ServerClient
from menny.page.transcription import TranscriptionSettings
from whisper.streaming import LiveState, LiveWord

SPEECH = clip("librivox_sns01_0870.wav")
MAX_WER = 15.0  # tiny.en gets this clip right but for a word at most
TIMEOUT_S = 300.0  # a failure guard for a loaded machine, not a speed requirement


def test_live_transcript_follows_a_recording_on_the_server(
    audio_server: Callable[..., ServerProcess], virtual_mic: VirtualMic
) -> None:
    client = ServerClient(audio_server().url)
    client.start()
    clip_id = client.status().clip_id
    settings = TranscriptionSettings(model="tiny.en")
    live = LiveTranscript(client, clip_id, model("tiny.en"), settings)
    wait_for(lambda: client.status().elapsed_s > 0.5, "the recording to start")
    virtual_mic.play(SPEECH.path)
    # The words are confirmed while the server is still recording.
    wait_for(lambda: wer([SPEECH.transcript], [live.state.confirmed_text]) <= MAX_WER, "the clip's words", TIMEOUT_S)
    assert client.status().recording
    # Its lag counts from the newest audio a pass took in, not from the recording's start.
    assert live.behind_s < client.status().elapsed_s / 2
    state = live.stop()
    assert not live.running and live.error is None
    assert state.audio_s > SPEECH.duration
    # A live transcript nobody asks for (its tab was closed) ends on its own.
    forgotten = LiveTranscript(client, clip_id, model("tiny.en"), settings, abandoned_s=1.0)
    wait_for(lambda: not forgotten.running, "the forgotten live transcript to end", TIMEOUT_S)
    assert client.stop().clip_id == clip_id


def test_live_html_shows_confirmed_words_then_tentative_ones_in_grey() -> None:
    state = LiveState(
        confirmed_words=(LiveWord(" Fish", 0.0, 0.4), LiveWord(" &", 0.4, 0.5), LiveWord(" chips.", 0.5, 0.9)),
        tentative_words=(LiveWord(" <Later>", 1.0, 1.4),),
    )
    shown = live_html(state)
    assert '<span class="menny-live-confirmed">Fish &amp; chips.</span> ' in shown
    assert '<span class="menny-live-tentative">&lt;Later&gt;</span>' in shown
    assert ".menny-live-tentative { color:" in shown
    assert "Listening" in live_html(LiveState())
    assert "stopped (RuntimeError: boom)" in live_html(state, "RuntimeError: boom")
