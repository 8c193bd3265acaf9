"""Live transcription: the words while the audio is still arriving.

A `StreamingTranscriber` holds the audio since the last confirmed sentence end. Each time
`interval_s` of new audio has come, `update()` decodes that buffer again:

- the confirmed words inside the buffer are forced as the decoder's prefix and the last
  confirmed words before it are the prompt, so only the unconfirmed tail is decoded;
- a word is confirmed once two passes agree on it and on every word before it: the last pass
  and the one before (the LocalAgreement-2 policy of whisper_streaming, Macháček et al., 2023),
  or else the last pass and the one before that, so that one word wavering between two
  spellings on alternate passes cannot hold up the rest;
- once a sentence end and the word after it are confirmed (and the buffer is longer than
  `trim_s`), the audio up to the sentence end is dropped; past `max_buffer_s`, the audio up to
  the confirmed word before the longest pause: a pass costs the same in the thirtieth minute
  as in the first;
- the voice-activity filter (whisper.vad) skips the pass when nothing was said after the last
  confirmed word, drops the silence at the buffer's start, and drops words that run on into
  the silence after the speech (Whisper's "Thank you." at a pause).

Whisper's encoder takes 30-second windows, most of which would be padding for a buffer of a few
seconds. Only the buffer and `pad_s` of silence are encoded; the rest of the window is filled
with the features of an all-silent window, computed once per model. The decoder thus sees a
whole window, as in training (given only the buffer's features it often loops), for a fraction
of the encoder's cost. The last pass's tentative tokens are checked in one decoder pass before
sampling token by token, so a pass samples only what changed.
"""

from __future__ import annotations

import string
import weakref
from collections import deque
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from .audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_frames
from .decoding import DecodingOptions, DecodingTask, detect_language
from .model import Whisper
from .timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS, WordTiming, find_alignment, merge_punctuations
from .tokenizer import get_tokenizer, language_code
from .vad import VadOptions, speech_regions

SENTENCE_ENDS = (".", "?", "!", "。", "！", "？")
# Speech runs at up to ~5 tokens a second; a pass allowed many more would only loop longer.
TOKENS_PER_SECOND = 6
EXTRA_TOKENS = 8
# The decoder's first step computes logits for every prompt token: a short prompt keeps it cheap.
PROMPT_TOKENS = 48
# A pass whose new text compresses this well is repeating itself (transcribe()'s threshold).
COMPRESSION_RATIO_THRESHOLD = 2.4
# Word ends from the alignment can be this early or late.
TIMING_SLACK_S = 0.2


@dataclass(frozen=True)
class LiveWord:
    word: str  # with its leading space, as in transcribe()'s words
    start: float  # seconds from the start of the audio
    end: float


@dataclass(frozen=True)
class LiveState:
    """What a live view shows: the confirmed words, then the tentative rest."""

    confirmed_words: tuple[LiveWord, ...] = ()
    tentative_words: tuple[LiveWord, ...] = ()
    audio_s: float = 0.0  # audio heard so far
    decoded_s: float = 0.0  # audio the words account for: heard up to the last pass
    language: str | None = None  # None until known

    @property
    def confirmed_text(self) -> str:
        return "".join(w.word for w in self.confirmed_words).strip()

    @property
    def tentative_text(self) -> str:
        return "".join(w.word for w in self.tentative_words).strip()

    @property
    def text(self) -> str:
        return "".join(w.word for w in (*self.confirmed_words, *self.tentative_words)).strip()


@dataclass
class _Word:
    word: str
    tokens: list[int]
    start: float  # absolute seconds
    end: float


def _key(word: str) -> str:
    """What two passes must agree on: the word without case or surrounding punctuation."""
    return word.strip().strip(string.punctuation + "“”‘’¿¡…").lower()


_silent_windows: dict[int, mx.array] = {}


def _silent_window(model: Whisper) -> mx.array:
    """Encoder features of 30 s of digital silence, (1, n_audio_ctx, n_audio_state); once per model."""
    key = id(model)
    if key not in _silent_windows:
        mel = log_mel_frames(np.zeros(N_SAMPLES, dtype=np.float32), model.dims.n_mels)
        features = model.embed_audio(mx.array(mel[:N_FRAMES])[None])
        mx.eval(features)
        _silent_windows[key] = features
        weakref.finalize(model, _silent_windows.pop, key, None)
    return _silent_windows[key]


class StreamingTranscriber:
    """Transcribes audio as it grows: `insert_audio`, then `update` now and then, `finish` at the end.

    `language` None detects it (multilingual models) on each pass until a word is confirmed,
    then keeps it. One caller at a time: it is not thread-safe.
    """

    def __init__(
        self,
        model: Whisper,
        *,
        language: str | None = None,
        task: str = "transcribe",
        interval_s: float = 1.0,
        trim_s: float = 5.0,
        max_buffer_s: float = 15.0,
        pad_s: float = 1.0,
        vad: bool = True,
        vad_options: VadOptions | None = None,
    ) -> None:
        if task == "translate" and not model.is_multilingual:
            raise ValueError("this model is English-only: it cannot translate; use a multilingual model such as base")
        if not 0 < trim_s <= max_buffer_s <= 25:
            raise ValueError("need 0 < trim_s <= max_buffer_s <= 25 seconds (a window holds 30)")
        self.model = model
        self.task = task
        self.interval_s = interval_s
        self.trim_s = trim_s
        self.max_buffer_s = max_buffer_s
        self.pad_s = pad_s
        self.vad = vad
        self.vad_options = vad_options or VadOptions()
        self._language = language_code(language) if language else (None if model.is_multilingual else "en")
        self._silence = _silent_window(model)
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0.0  # seconds of audio dropped before the buffer
        self._heard = 0  # samples inserted
        self._decoded_at = 0  # samples inserted at the last pass
        self._confirmed: list[_Word] = []
        self._first_in_buffer = 0  # index of the first confirmed word still in the buffer
        self._tentative: list[_Word] = []
        # The last two passes' words after what was confirmed before each: (confirmed count, keys).
        self._history: deque[tuple[int, list[str]]] = deque(maxlen=2)
        self._speech_until = float("inf")  # where the voice-activity filter last heard speech end
        self.passes = 0  # decodes run, for tests and benchmarks

    # ------------------------------------------------------------------ public

    def insert_audio(self, samples: np.ndarray) -> None:
        """Append 16 kHz mono samples (float, -1..1) to what has been heard."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._buffer = np.concatenate([self._buffer, samples])
        self._heard += samples.size

    def update(self) -> LiveState:
        """Decode again if `interval_s` of audio came since the last pass; the words so far."""
        if (self._heard - self._decoded_at) / SAMPLE_RATE >= self.interval_s:
            self._step(final=False)
        return self.state

    def finish(self) -> LiveState:
        """Decode what is left and confirm it all: the final live transcript."""
        if self._heard > self._decoded_at or self._tentative:
            self._step(final=True)
        return self.state

    @property
    def state(self) -> LiveState:
        return LiveState(
            confirmed_words=tuple(LiveWord(w.word, w.start, w.end) for w in self._confirmed),
            tentative_words=tuple(LiveWord(w.word, w.start, w.end) for w in self._tentative),
            audio_s=self._heard / SAMPLE_RATE,
            decoded_s=self._decoded_at / SAMPLE_RATE,
            language=self._language,
        )

    @property
    def buffer_s(self) -> float:
        """Seconds of audio held for the next pass."""
        return self._buffer.size / SAMPLE_RATE

    # ---------------------------------------------------------------- one pass

    def _step(self, final: bool) -> None:
        self._decoded_at = self._heard
        if not self._speech_after_confirmed():
            # Nothing said since the last confirmed word: whatever was tentative was not speech.
            self._tentative = []
            self._history.clear()
            self._bound_buffer()
            return
        words, language = self._decode()
        self.passes += 1
        keys = [_key(w.word) for w in words]
        agreed = len(keys) if final else self._agreement(keys)
        if agreed and self._language is None:
            self._language = language
        self._history.append((len(self._confirmed), keys))
        self._confirmed.extend(words[:agreed])
        self._tentative = words[agreed:]
        self._trim_at_sentence_end()
        self._bound_buffer()

    def _agreement(self, keys: list[str]) -> int:
        """How many of a pass's first words an earlier pass (the last or the one before) agrees on."""
        confirmed = len(self._confirmed)
        best = 0
        for start, earlier in self._history:
            # That pass began at confirmed word `start`; it must agree with what was confirmed since.
            if earlier[: confirmed - start] != [_key(w.word) for w in self._confirmed[start:]]:
                continue
            agreed = 0
            for new, old in zip(keys, earlier[confirmed - start :]):
                if new != old:
                    break
                agreed += 1
            best = max(best, agreed)
        return best

    def _speech_after_confirmed(self) -> bool:
        """Whether the voice-activity filter hears speech after the last confirmed word. While no
        confirmed word is in the buffer, the silence at its start is dropped."""
        if self._buffer.size < HOP_LENGTH * 4:
            return False
        if not self.vad:
            return True
        regions = speech_regions(self._buffer, self.vad_options)
        if regions:
            self._speech_until = self._buffer_start + regions[-1][1]
        if self._first_in_buffer == len(self._confirmed):
            # Nothing confirmed to keep: the silence before the first speech is of no use
            # (without speech, all but the last moment, where a word may be starting).
            first_speech = regions[0][0] if regions else self.buffer_s - self.vad_options.pad_s
            self._drop_until(self._buffer_start + first_speech)
            return bool(regions)
        if not regions:
            return False
        spoken_until = self._confirmed[-1].end - self._buffer_start + TIMING_SLACK_S
        duration = self.buffer_s
        for _, end in regions:
            # Regions are padded, except one cut short by the buffer's end: speech going on.
            speech_end = end if end >= duration else end - self.vad_options.pad_s
            if speech_end > spoken_until:
                return True
        return False

    def _decode(self) -> tuple[list[_Word], str]:
        """The buffer's words after the confirmed ones, and the language they are in."""
        n_frames = self._buffer.size // HOP_LENGTH
        mel = log_mel_frames(self._buffer, self.model.dims.n_mels, padding=round(self.pad_s * SAMPLE_RATE))
        n_encoded = min(N_FRAMES, mel.shape[0]) // 2 * 2
        head = self.model.embed_audio(mx.array(mel[:n_encoded])[None], partial=True)
        features = mx.concatenate([head, self._silence[:, head.shape[1] :]], axis=1)

        language = self._language
        if language is None:
            _, (probs,) = detect_language(self.model, features)
            language = max(probs, key=probs.get)
        tokenizer = get_tokenizer(
            self.model.is_multilingual, num_languages=self.model.num_languages, language=language, task=self.task
        )
        prefix = [t for w in self._confirmed[self._first_in_buffer :] for t in w.tokens]
        unconfirmed_s = self.buffer_s - (self._confirmed[-1].end - self._buffer_start if prefix else 0.0)
        options = DecodingOptions(
            task=self.task,
            language=language,
            without_timestamps=True,
            prompt=[t for w in self._confirmed[: self._first_in_buffer] for t in w.tokens][-PROMPT_TOKENS:],
            prefix=prefix,
            # After a prefix, ending at once is right when nothing more was said.
            suppress_blank=not prefix,
            # Ranking the one greedy candidate by its length divides by zero when it is empty;
            # 0 ranks by log-probability alone, which for one candidate changes nothing else.
            length_penalty=0.0,
            sample_len=EXTRA_TOKENS + round(TOKENS_PER_SECOND * max(unconfirmed_s, 0.0)),
        )
        guess = [t for w in self._tentative for t in w.tokens]
        result = DecodingTask(self.model, options, guess).run(features)[0]
        silent = result.no_speech_prob > 0.6 and result.avg_logprob < -1.0
        if not result.tokens or silent or result.compression_ratio > COMPRESSION_RATIO_THRESHOLD:
            return [], language
        timings = find_alignment(self.model, tokenizer, prefix + result.tokens, features[0], n_frames)
        words = self._words_after(timings, len(prefix))
        # Words that run on into the silence after the speech are the model's ("Thank you.").
        heard = next((i for i, w in enumerate(words) if w.end > self._speech_until), len(words))
        return words[:heard], language

    def _words_after(self, timings: list[WordTiming], n_prefix: int) -> list[_Word]:
        """The aligned words after the first `n_prefix` tokens, punctuation joined to its word."""
        new: list[WordTiming] = []
        position = 0
        for timing in timings:
            skip = max(0, n_prefix - position)
            position += len(timing.tokens)
            if skip < len(timing.tokens):
                # A word that goes on from the prefix's last one stands alone with its new tokens.
                new.append(replace(timing, tokens=timing.tokens[skip:]) if skip else timing)
        merge_punctuations(new, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS)
        return [
            _Word(w.word, list(w.tokens), round(self._buffer_start + w.start, 2), round(self._buffer_start + w.end, 2))
            for w in new
            if w.word
        ]

    # -------------------------------------------------------------- the buffer

    def _drop_until(self, seconds: float) -> None:
        """Drop the audio before `seconds` (absolute), and the confirmed words ending there."""
        cut = min(self._buffer.size, max(0, round((seconds - self._buffer_start) * SAMPLE_RATE)))
        if cut:
            self._buffer = self._buffer[cut:].copy()
            self._buffer_start += cut / SAMPLE_RATE
        while (
            self._first_in_buffer < len(self._confirmed)
            and self._confirmed[self._first_in_buffer].end <= self._buffer_start
        ):
            self._first_in_buffer += 1

    def _cut_after(self, index: int) -> None:
        """Drop the audio up to confirmed word `index`'s end, but not into the next word."""
        word = self._confirmed[index]
        following = [*self._confirmed[index + 1 :], *self._tentative]
        cut = word.end
        if following and word.start < following[0].start < cut:
            cut = following[0].start
        self._drop_until(cut)
        self._first_in_buffer = max(self._first_in_buffer, index + 1)

    def _trim_at_sentence_end(self) -> None:
        if self.buffer_s <= self.trim_s:
            return
        # Only a sentence end that a confirmed word follows: a full stop the model put in
        # mid-sentence, and then took back, must not cut the speech after it.
        for index in range(len(self._confirmed) - 2, self._first_in_buffer - 1, -1):
            if self._confirmed[index].word.rstrip().endswith(SENTENCE_ENDS):
                self._cut_after(index)
                return

    def _bound_buffer(self) -> None:
        """Past `max_buffer_s`, cut after the confirmed word before the longest pause. With none
        confirmed, confirm the older half of the tentative words, or drop audio nobody agreed on."""
        while self.buffer_s > self.max_buffer_s:
            if self._first_in_buffer == len(self._confirmed):
                keep_from = self._buffer_start + self.buffer_s - self.max_buffer_s / 2
                n_older = next((i for i, w in enumerate(self._tentative) if w.end > keep_from), len(self._tentative))
                older, self._tentative = self._tentative[:n_older], self._tentative[n_older:]
                self._history.clear()
                if not older:
                    self._drop_until(keep_from)
                    return
                self._confirmed.extend(older)
            buffer_end = self._buffer_start + self.buffer_s
            words = [*self._confirmed[self._first_in_buffer :], *self._tentative]
            n_confirmed = len(self._confirmed) - self._first_in_buffer
            pauses = [
                ((words[i + 1].start if i + 1 < len(words) else buffer_end) - words[i].end, i)
                for i in range(n_confirmed)
            ]
            self._cut_after(self._first_in_buffer + max(pauses)[1])
