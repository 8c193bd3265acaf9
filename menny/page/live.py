"""The live transcript of a recording on the microphone server, while it is being recorded.

A `LiveTranscript` works in a thread of its own, so that the page's counter and level meter keep
moving while it computes: every `poll_s` it fetches the audio recorded since its last poll
(GET /wav?partial=true&start_frame=N), gives it to whisper's StreamingTranscriber and keeps the
latest words for the page.  A pass that takes longer than `poll_s` is followed at once by the
next, over all the audio that came meanwhile: passes never queue, and the words never fall
further behind than one pass over the newest audio.  It ends when stopped (the page stops it on
Stop, before the final transcription), or when the page has not asked for its words for
`abandoned_s` (the tab was closed).

The browser microphone (st.audio_input) hands the page its recording only after Stop, so a live
transcript is possible only through the server.
"""

from __future__ import annotations

import html
import logging
import threading
import time

from menny.wav import wav_samples
from whisper.model import Whisper
from whisper.streaming import LiveState, StreamingTranscriber

from .server_client import ServerClient, ServerError
from .transcription import TranscriptionSettings

log = logging.getLogger("menny.live")

STYLE = """
<style>
.menny-live { line-height: 1.75; font-size: 1.02rem; min-height: 1.75rem; }
.menny-live-tentative { color: #8b8b9c; }
.menny-live-waiting { color: #6b6b80; font-style: italic; }
</style>
"""


class LiveTranscript:
    """Follows clip `clip_id` on the server and transcribes it as it grows."""

    def __init__(
        self,
        client: ServerClient,
        clip_id: str,
        model: Whisper,
        settings: TranscriptionSettings,
        *,
        poll_s: float = 1.0,
        abandoned_s: float = 20.0,
    ) -> None:
        self.clip_id = clip_id
        self._client = client
        self._model = model
        self._settings = settings
        self._poll_s = poll_s
        self._abandoned_s = abandoned_s
        self._state = LiveState()
        self._covered_at = time.monotonic()  # when the audio the words account for was fetched
        self._error: str | None = None
        self._asked = time.monotonic()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"menny-live-{clip_id}", daemon=True)
        self._thread.start()

    @property
    def state(self) -> LiveState:
        """The words so far (asking for them keeps the transcript going)."""
        self._asked = time.monotonic()
        return self._state

    @property
    def behind_s(self) -> float:
        """How long ago the newest audio the words account for was recorded: the words' lag."""
        return time.monotonic() - self._covered_at

    @property
    def error(self) -> str | None:
        """Why the live transcript stopped early, if it did."""
        return self._error

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> LiveState:
        """Stop after the pass under way (the model is then free for the final transcription)."""
        self._stopping.set()
        self._thread.join(timeout)
        return self._state

    def _run(self) -> None:
        try:
            # Made here, not in the page's thread: the first one encodes a silent window (seconds).
            streamer = StreamingTranscriber(
                self._model,
                language=self._settings.language,
                task=self._settings.task,
                # Each poll's audio gets a pass, even when it came a little sooner than poll_s.
                interval_s=self._poll_s / 2,
            )
            seen = 0
            while not self._stopping.is_set() and time.monotonic() - self._asked < self._abandoned_s:
                fetched_at = time.monotonic()
                try:
                    wav = self._client.partial_wav(self.clip_id, start_frame=seen)
                except ServerError as error:
                    wav = None  # the server may be back at the next poll; the recording is safe there
                    log.warning("live transcript of %s: %s", self.clip_id, error)
                if wav:
                    samples = wav_samples(wav)
                    seen += samples.size
                    streamer.insert_audio(samples)
                    self._state = streamer.update()
                    if self._state.decoded_s == self._state.audio_s:
                        self._covered_at = fetched_at
                self._stopping.wait(max(0.0, fetched_at + self._poll_s - time.monotonic()))
        except Exception as error:  # the page must stay up; the final transcript still comes on Stop
            log.exception("live transcript of %s failed", self.clip_id)
            self._error = f"{error.__class__.__name__}: {error}"


def live_html(state: LiveState, error: str | None = None) -> str:
    """Confirmed words in normal type, then the tentative rest in grey."""
    if error:
        body = (
            f'<span class="menny-live-waiting">The live transcript stopped ({html.escape(error)}); '
            "the transcript still comes when you press Stop.</span>"
        )
    elif not state.confirmed_words and not state.tentative_words:
        body = '<span class="menny-live-waiting">Listening…</span>'
    else:
        confirmed = html.escape(state.confirmed_text)
        tentative = html.escape(state.tentative_text)
        body = (
            f'<span class="menny-live-confirmed">{confirmed}</span>'
            f'{" " if confirmed and tentative else ""}<span class="menny-live-tentative">{tentative}</span>'
        )
    return f'{STYLE}<div class="menny-live">{body}</div>'
