"""Transcribe audio of any length: slide a 30-second window, decode, cut into segments.

Each window is decoded with the text so far as its prompt; a window whose text looks
wrong (too repetitive or too unlikely) is decoded again at a higher temperature.
Where the decoder ends a window with a timestamp, the next window starts there.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import mlx.core as mx
import numpy as np
import tqdm

from .audio import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FRAMES,
    SAMPLE_RATE,
    load_audio,
    log_mel_frames,
    pad_or_trim,
)
from .backends import backend_for
from .decoding import DecodingOptions, DecodingResult, DecodingTask, detect_language
from .model import Whisper
from .models import DEFAULT_MODEL, load_model
from .runtime import choose_device
from .timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS, add_word_timestamps
from .tokenizer import LANGUAGES, Tokenizer, get_tokenizer, language_code
from .vad import speech_regions
from .writers import format_timestamp

ProgressCallback = Callable[[float, float], None]  # (seconds done, seconds in all)
SegmentCallback = Callable[[list[dict]], None]  # the segments a window added
AudioInput = str | os.PathLike | bytes | np.ndarray | mx.array  # a file, its bytes, or a 16 kHz waveform

_PUNCTUATION = "\"'“¿([{-\"'.。,，!！?？:：”)]}、"


@dataclass(frozen=True)
class TranscribeOptions:
    temperature: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    initial_prompt: str | None = None
    carry_initial_prompt: bool = False
    word_timestamps: bool = False
    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS
    clip_timestamps: str | list[float] = "0"
    hallucination_silence_threshold: float | None = None
    # Windows whose loudest sample is below this many dBFS are skipped undecoded: given
    # silence, the model invents text ("you", "Thank you.") with little doubt.
    silence_floor_db: float | None = -60.0
    vad_filter: bool = False  # decode only where whisper.vad finds speech
    decoding: DecodingOptions = field(default_factory=DecodingOptions)  # each window's, its temperature aside

    def __post_init__(self) -> None:
        if isinstance(self.temperature, (int, float)):  # one temperature: no fallback
            object.__setattr__(self, "temperature", (self.temperature,))
        else:
            object.__setattr__(self, "temperature", tuple(self.temperature))

    @classmethod
    def names(cls) -> tuple[set[str], set[str]]:
        """The keywords `from_keywords` takes: this class's own, and the decoding's."""
        return {f.name for f in fields(cls)} - {"decoding"}, {f.name for f in fields(DecodingOptions)} - {"temperature"}

    @classmethod
    def from_keywords(cls, **keywords: object) -> TranscribeOptions:
        """Options from keyword arguments named as this class's and `DecodingOptions`' fields
        (`transcribe`'s keywords); an unknown name fails here, with the names there are."""
        own, decoding = cls.names()
        unknown = sorted(set(keywords) - own - decoding)
        if unknown:
            valid = ", ".join(sorted(own | decoding))
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; the options are: {valid}")
        return cls(
            **{k: v for k, v in keywords.items() if k in own},
            decoding=DecodingOptions(**{k: v for k, v in keywords.items() if k in decoding}),
        )


# ------------------------------------------------------------- one window


def decoding_options(decoding: DecodingOptions, temperature: float) -> DecodingOptions:
    """The options of one decode: beams only at temperature 0, `best_of` only above it."""
    if temperature > 0:
        return replace(decoding, temperature=temperature, beam_size=None, patience=None)
    return replace(decoding, temperature=temperature, best_of=None)


def needs_fallback(result: DecodingResult, options: TranscribeOptions) -> bool:
    """Whether a window's text is too repetitive, or too unlikely without being silence."""
    too_repetitive = (
        options.compression_ratio_threshold is not None
        and result.compression_ratio > options.compression_ratio_threshold
    )
    too_unlikely = options.logprob_threshold is not None and result.avg_logprob < options.logprob_threshold
    silent = options.no_speech_threshold is not None and result.no_speech_prob > options.no_speech_threshold
    return too_repetitive or (too_unlikely and not silent)


def decode_with_fallback(
    model: Whisper, mel: mx.array, options: TranscribeOptions, decoding: DecodingOptions
) -> DecodingResult:
    """Decode at rising temperatures until the text is neither repetitive nor unlikely."""
    result = None
    for temperature in options.temperature:
        result = DecodingTask(model, decoding_options(decoding, temperature)).run(mel[None])[0]
        if not needs_fallback(result, options):
            break
    return result


def _segment(seek: int, start: float, end: float, tokens: list[int], result: DecodingResult, tokenizer: Tokenizer):
    text_tokens = [t for t in tokens if t < tokenizer.eot]
    return {
        "seek": seek,
        "start": start,
        "end": end,
        "text": tokenizer.decode(text_tokens),
        "tokens": list(tokens),
        "temperature": result.temperature,
        "avg_logprob": result.avg_logprob,
        "compression_ratio": result.compression_ratio,
        "no_speech_prob": result.no_speech_prob,
    }


def split_segments(
    result: DecodingResult, tokenizer: Tokenizer, seek: int, segment_size: int
) -> tuple[list[dict], int, bool]:
    """Cut a window's tokens at timestamp pairs; return the segments, the next seek,
    and whether the text ended with a single timestamp (the window was used up)."""
    tokens = np.array(result.tokens, dtype=np.int64)
    begin = tokenizer.timestamp_begin
    time_offset = seek * HOP_LENGTH / SAMPLE_RATE
    precision = 0.02
    is_timestamp = tokens >= begin
    single_timestamp_ending = is_timestamp[-2:].tolist() == [False, True]
    consecutive = (np.where(is_timestamp[:-1] & is_timestamp[1:])[0] + 1).tolist()
    segments = []
    if consecutive:
        if single_timestamp_ending:
            consecutive.append(len(tokens))
        last_slice = 0
        for current_slice in consecutive:
            piece = tokens[last_slice:current_slice]
            start = time_offset + (int(piece[0]) - begin) * precision
            end = time_offset + (int(piece[-1]) - begin) * precision
            segments.append(_segment(seek, start, end, piece.tolist(), result, tokenizer))
            last_slice = current_slice
        if single_timestamp_ending:
            next_seek = seek + segment_size
        else:
            # The window ends in mid-speech: resume at the last complete segment's end.
            next_seek = seek + (int(tokens[last_slice - 1]) - begin) * 2
    else:
        duration = segment_size * HOP_LENGTH / SAMPLE_RATE
        timestamps = tokens[is_timestamp]
        if len(timestamps) and timestamps[-1] != begin:
            duration = (int(timestamps[-1]) - begin) * precision
        segments.append(_segment(seek, time_offset, time_offset + duration, tokens.tolist(), result, tokenizer))
        next_seek = seek + segment_size
    return segments, next_seek, single_timestamp_ending


# --------------------------------------------------- hallucination checks


def _word_anomaly(word: dict) -> float:
    probability = word.get("probability", 0.0)
    duration = word["end"] - word["start"]
    score = 1.0 if probability < 0.15 else 0.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def is_segment_anomaly(segment: dict | None) -> bool:
    """Words that are unlikely and implausibly short or long: a hallucination's mark."""
    if segment is None or not segment.get("words"):
        return False
    words = [w for w in segment["words"] if w["word"] not in _PUNCTUATION][:8]
    score = sum(_word_anomaly(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def _first_with_words(segments: list[dict]) -> dict | None:
    return next((s for s in segments if s.get("words")), None)


def _last_word_end(segments: list[dict]) -> float | None:
    words = [w for s in segments for w in s.get("words", [])]
    return words[-1]["end"] if words else None


# ------------------------------------------------------------- the whole


@dataclass
class _Progress:
    """The text so far, and where the next window starts."""

    seek: int
    all_tokens: list[int] = field(default_factory=list)
    all_segments: list[dict] = field(default_factory=list)
    prompt_reset_since: int = 0
    last_speech_timestamp: float = 0.0


def _seek_clips(clip_timestamps: str | list[float], content_frames: int) -> list[tuple[int, int]]:
    if isinstance(clip_timestamps, str):
        clip_timestamps = [float(t) for t in clip_timestamps.split(",") if t.strip()] or [0.0]
    points = [round(t * FRAMES_PER_SECOND) for t in clip_timestamps]
    if len(points) % 2:
        points.append(content_frames)
    return [(points[i], min(points[i + 1], content_frames)) for i in range(0, len(points), 2)]


def _choose_language(model: Whisper, mel: np.ndarray, language: str | None, verbose: bool | None) -> str:
    if language is not None:
        return language_code(language)
    if not model.is_multilingual:
        return "en"
    window = mx.array(pad_or_trim(mel[:N_FRAMES], N_FRAMES, axis=0))
    _, probs = detect_language(model, window)
    language = max(probs, key=probs.get)
    if verbose:
        print(f"Detected language: {LANGUAGES[language].title()}")
    return language


def _is_silent(samples: np.ndarray, floor_db: float | None) -> bool:
    if floor_db is None:
        return False
    return samples.size == 0 or float(np.abs(samples).max()) < 10 ** (floor_db / 20)


def _prompt(state: _Progress, prompt_tokens: list[int], options: TranscribeOptions, n_text_ctx: int) -> list[int]:
    if not options.carry_initial_prompt:
        return state.all_tokens[state.prompt_reset_since :]
    # The initial prompt always leads; recent text fills what room is left.
    room = n_text_ctx // 2 - 1 - len(prompt_tokens)
    recent = state.all_tokens[max(len(prompt_tokens), state.prompt_reset_since) :]
    return prompt_tokens + (recent[-room:] if room > 0 else [])


def _skip_hallucinations(
    segments: list[dict],
    state: _Progress,
    threshold: float,
    time_offset: float,
    window_duration: float,
    content_frames: int,
) -> bool:
    """Drop a hallucinated-looking segment surrounded by silence; True when the whole
    window should be skipped to just before the first speech."""
    first = _first_with_words(segments)
    if first is not None and is_segment_anomaly(first):
        gap = first["start"] - time_offset
        if gap > threshold:
            state.seek += round(gap * FRAMES_PER_SECOND)
            return True
    content_duration = content_frames * HOP_LENGTH / SAMPLE_RATE
    window_end = time_offset + 30.0
    last_end = state.last_speech_timestamp
    for i, segment in enumerate(segments):
        if not segment.get("words"):
            continue
        if is_segment_anomaly(segment):
            following = _first_with_words(segments[i + 1 :])
            next_start = following["words"][0]["start"] if following else time_offset + window_duration
            silence_before = (
                segment["start"] - last_end > threshold
                or segment["start"] < threshold
                or segment["start"] - time_offset < 2.0
            )
            silence_after = (
                next_start - segment["end"] > threshold
                or is_segment_anomaly(following)
                or window_end - segment["end"] < 2.0
            )
            if silence_before and silence_after:
                state.seek = round(max(time_offset + 1, segment["start"]) * FRAMES_PER_SECOND)
                if content_duration - segment["end"] < threshold:
                    state.seek = content_frames
                del segments[i:]
                return False
        last_end = segment["end"]
    return False


def _print_segments(segments: list[dict]) -> None:
    for segment in segments:
        print(f"[{format_timestamp(segment['start'])} --> {format_timestamp(segment['end'])}] {segment['text']}")


@functools.lru_cache(maxsize=1)
def kept_model(path_or_hf_repo: str, dtype: mx.Dtype | None = None) -> Whisper:
    """The model that calls naming it (mlx-whisper's `transcribe(audio, path_or_hf_repo=...)`) use:
    loaded at the first and kept for the next ones, until a call names another."""
    return load_model(path_or_hf_repo, dtype=dtype)


def transcribe(
    model: Whisper | AudioInput | None = None,
    audio: AudioInput | None = None,
    *,
    path_or_hf_repo: str | None = None,
    verbose: bool | None = None,
    progress_callback: ProgressCallback | None = None,
    segment_callback: SegmentCallback | None = None,
    device: str | None = None,
    temperature: float | tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    compression_ratio_threshold: float | None = 2.4,
    logprob_threshold: float | None = -1.0,
    no_speech_threshold: float | None = 0.6,
    condition_on_previous_text: bool = True,
    initial_prompt: str | None = None,
    carry_initial_prompt: bool = False,
    word_timestamps: bool = False,
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
    clip_timestamps: str | list[float] = "0",
    hallucination_silence_threshold: float | None = None,
    silence_floor_db: float | None = -60.0,
    vad_filter: bool = False,
    **decode_options,
) -> dict:
    """Transcribe (or translate) audio of any length.

    Called as openai-whisper's `transcribe(model, audio, ...)`, or as mlx-whisper's
    `transcribe(audio, path_or_hf_repo=..., ...)`: the audio first and the model by name
    (default: base), kept for the next call (`kept_model`); there `fp16=False` loads it in
    float32, and by default it loads as `load_model` does (float16 on a GPU, float32 on a CPU).

    `audio` is a path, file bytes or a 16 kHz waveform.  Returns openai-whisper's result:
    `{"text", "segments", "language"}`.  `verbose` True prints each segment, False shows
    a progress bar, None neither; `progress_callback(done, total)` gets seconds after each
    window, `segment_callback(segments)` that window's new segments just before.
    `device` ("cpu" or "gpu") overrides the device the model was loaded for.
    Other keyword arguments are `DecodingOptions` fields (language, task, beam_size, ...).
    """
    options = TranscribeOptions.from_keywords(
        temperature=temperature,
        compression_ratio_threshold=compression_ratio_threshold,
        logprob_threshold=logprob_threshold,
        no_speech_threshold=no_speech_threshold,
        condition_on_previous_text=condition_on_previous_text,
        initial_prompt=initial_prompt,
        carry_initial_prompt=carry_initial_prompt,
        word_timestamps=word_timestamps,
        prepend_punctuations=prepend_punctuations,
        append_punctuations=append_punctuations,
        clip_timestamps=clip_timestamps,
        hallucination_silence_threshold=hallucination_silence_threshold,
        silence_floor_db=silence_floor_db,
        vad_filter=vad_filter,
        **decode_options,
    )
    if not isinstance(model, Whisper):
        if model is not None and audio is not None:
            raise TypeError("give transcribe(model, audio) or transcribe(audio, path_or_hf_repo=name)")
        audio = audio if model is None else model
        dtype = None if options.decoding.fp16 else mx.float32
        model = kept_model(path_or_hf_repo or DEFAULT_MODEL, dtype)
    elif path_or_hf_repo is not None:
        raise TypeError("path_or_hf_repo names the model of transcribe(audio, ...); here a model is given")
    if audio is None:
        raise TypeError("transcribe needs the audio: a path, file bytes or a 16 kHz waveform")
    return transcribe_with(
        model,
        audio,
        options,
        verbose=verbose,
        progress_callback=progress_callback,
        segment_callback=segment_callback,
        device=device,
    )


def transcribe_with(
    model: Whisper,
    audio: AudioInput,
    options: TranscribeOptions,
    *,
    verbose: bool | None = None,
    progress_callback: ProgressCallback | None = None,
    segment_callback: SegmentCallback | None = None,
    device: str | None = None,
) -> dict:
    """`transcribe`, its options given as one object (the page and the command line build it)."""
    with on_device(model, device):
        job = FileTranscription(model, audio, options, verbose)
        with tqdm.tqdm(total=job.content_frames, unit="frames", disable=verbose is not False) as bar:
            reported = 0

            def report(previous_seek: int, done: int) -> None:
                nonlocal reported
                bar.update(done - previous_seek)
                if segment_callback is not None:
                    segment_callback(job.state.all_segments[reported:])
                    reported = len(job.state.all_segments)
                if progress_callback is not None:
                    progress_callback(done / FRAMES_PER_SECOND, job.content_frames / FRAMES_PER_SECOND)

            job.on_progress = report
            while (window := job.next_window()) is not None:
                job.add_result(decode_with_fallback(model, window, options, job.decoding))
        return job.result()


@contextlib.contextmanager
def on_device(model: Whisper, device: str | None) -> Iterator[None]:
    """Compute on `device` inside the block, with the model's backend for it; None keeps the
    device and backend the model was loaded for."""
    if device is None:
        yield
        return
    chosen = choose_device(device)
    loaded_for = model.backend
    with mx.stream(chosen):
        model.backend = backend_for(model, chosen)
        try:
            yield
        finally:
            model.backend = loaded_for


class Features(NamedTuple):
    """A file's 16 kHz waveform and its log-mel frames (padded by one window), made
    ahead of the model: in `whisper.batch`'s threads, or by a corpus's CPU workers."""

    waveform: np.ndarray
    mel: np.ndarray


def audio_features(audio: AudioInput | Features, n_mels: int) -> Features:
    """The waveform and its log-mel frames: numpy only, so they can be made in worker
    threads or processes while the model decodes.  Features pass through unchanged."""
    if isinstance(audio, Features):
        return audio
    if isinstance(audio, mx.array):
        audio = np.array(audio, dtype=np.float32)
    waveform = audio if isinstance(audio, np.ndarray) else load_audio(audio)
    return Features(waveform, log_mel_frames(waveform, n_mels, padding=N_FRAMES * HOP_LENGTH))


class FileTranscription:
    """One file's transcription, window by window.

    `next_window()` returns the next 30-second window to decode (silent ones are skipped)
    with `decoding` set for it, or None at the end; `add_result()` takes that
    window's decoding.  `transcribe` decodes each window alone; `whisper.batch` decodes
    windows of several files together.
    """

    def __init__(
        self,
        model: Whisper,
        audio: AudioInput | Features,
        options: TranscribeOptions,
        verbose: bool | None = None,
        features: Features | None = None,
    ):
        if options.hallucination_silence_threshold is not None and not options.word_timestamps:
            raise ValueError("hallucination_silence_threshold needs word_timestamps=True")
        self.model = model
        self.options = options
        self.verbose = verbose
        self.on_progress: Callable[[int, int], None] | None = None  # (seek before, frames done)
        self.waveform, self.mel = features or audio_features(audio, model.dims.n_mels)
        self.content_frames = self.mel.shape[0] - N_FRAMES

        language = _choose_language(model, self.mel, options.decoding.language, verbose)
        task = options.decoding.task
        if task == "translate" and not model.is_multilingual:
            raise ValueError("this model is English-only: it cannot translate; use a multilingual model such as base")
        self.tokenizer = get_tokenizer(
            model.is_multilingual, num_languages=model.num_languages, language=language, task=task
        )
        self.decoding = replace(options.decoding, language=language)  # this window's, its prompt set for it

        clip_timestamps = options.clip_timestamps
        if options.vad_filter:
            if clip_timestamps not in ("0", [0], [0.0]):
                raise ValueError("vad_filter chooses the clips itself: give it or clip_timestamps, not both")
            regions = speech_regions(self.waveform)
            # No speech at all: a single empty clip, so no window is decoded.
            clip_timestamps = [t for region in regions for t in region] or [0.0, 0.0]
        self.clips = _seek_clips(clip_timestamps, self.content_frames)
        self.clip_index = 0
        prompt = options.initial_prompt
        self.prompt_tokens = self.tokenizer.encode(" " + prompt.strip()) if prompt else []
        self.state = _Progress(seek=self.clips[0][0], all_tokens=list(self.prompt_tokens))
        self._window: tuple[int, int, mx.array] | None = None  # (seek, clip end, mel) being decoded

    def next_window(self) -> mx.array | None:
        """The next window to decode, (frames, n_mels); None once the audio is done."""
        state = self.state
        while self.clip_index < len(self.clips):
            clip_start, clip_end = self.clips[self.clip_index]
            state.seek = max(state.seek, clip_start)
            if state.seek >= clip_end:
                self.clip_index += 1
                if self.clip_index < len(self.clips):
                    state.seek = self.clips[self.clip_index][0]
                continue
            seek = state.seek
            window_end = min(clip_end, seek + N_FRAMES)
            if _is_silent(self.waveform[seek * HOP_LENGTH : window_end * HOP_LENGTH], self.options.silence_floor_db):
                state.seek = window_end
                self._report(seek)
                continue
            segment_size = min(N_FRAMES, self.content_frames - seek, clip_end - seek)
            window = mx.array(pad_or_trim(self.mel[seek : seek + segment_size], N_FRAMES, axis=0))
            prompt = _prompt(state, self.prompt_tokens, self.options, self.model.dims.n_text_ctx)
            self.decoding = replace(self.decoding, prompt=prompt)
            self._window = (seek, clip_end, window)
            return window
        return None

    def add_result(self, result: DecodingResult) -> None:
        """Add the segments of the window `next_window` returned, and move past it."""
        if self._window is None:
            raise RuntimeError("add_result needs a window from next_window first")
        seek, clip_end, window = self._window
        self._window = None
        _add_window(self, result, seek, clip_end, window)
        self._report(seek)

    @property
    def duration(self) -> float:
        """Seconds of audio in the file."""
        return self.waveform.shape[0] / SAMPLE_RATE

    def result(self) -> dict:
        return {
            "text": self.tokenizer.decode(self.state.all_tokens[len(self.prompt_tokens) :]),
            "segments": self.state.all_segments,
            "language": self.decoding.language,
        }

    def _report(self, previous_seek: int) -> None:
        if self.on_progress is not None:
            self.on_progress(previous_seek, min(self.content_frames, self.state.seek))


def _add_window(job: FileTranscription, result: DecodingResult, seek: int, clip_end: int, window: mx.array) -> None:
    """Add a decoded window's segments to the job, and move its seek on."""
    options, state, tokenizer = job.options, job.state, job.tokenizer
    content_frames = job.content_frames
    time_offset = seek * HOP_LENGTH / SAMPLE_RATE
    segment_size = min(N_FRAMES, content_frames - seek, clip_end - seek)
    window_duration = segment_size * HOP_LENGTH / SAMPLE_RATE

    if options.no_speech_threshold is not None:
        silent = result.no_speech_prob > options.no_speech_threshold
        confident = options.logprob_threshold is not None and result.avg_logprob > options.logprob_threshold
        if silent and not confident:
            state.seek += segment_size
            return

    segments, state.seek, single_timestamp_ending = split_segments(result, tokenizer, seek, segment_size)

    if options.word_timestamps:
        add_word_timestamps(
            segments=segments,
            model=job.model,
            tokenizer=tokenizer,
            mel=window,
            num_frames=segment_size,
            prepend_punctuations=options.prepend_punctuations,
            append_punctuations=options.append_punctuations,
            last_speech_timestamp=state.last_speech_timestamp,
        )
        last_end = _last_word_end(segments)
        if not single_timestamp_ending and last_end is not None and last_end > time_offset:
            state.seek = round(last_end * FRAMES_PER_SECOND)
        if options.hallucination_silence_threshold is not None:
            threshold = options.hallucination_silence_threshold
            if not single_timestamp_ending and last_end is not None and last_end > time_offset:
                remaining = time_offset + 30.0 - last_end
                state.seek = round(last_end * FRAMES_PER_SECOND) if remaining > threshold else seek + segment_size
            if _skip_hallucinations(segments, state, threshold, time_offset, window_duration, content_frames):
                return
        last_end = _last_word_end(segments)
        if last_end is not None:
            state.last_speech_timestamp = last_end

    for segment in segments:
        # A segment with no duration or no text is noise from the decoder: keep it empty.
        if segment["start"] == segment["end"] or not segment["text"].strip():
            segment.update(text="", tokens=[], words=[])
    if job.verbose:
        _print_segments(segments)
    first_id = len(state.all_segments)
    state.all_segments.extend({"id": first_id + i, **segment} for i, segment in enumerate(segments))
    state.all_tokens.extend(token for segment in segments for token in segment["tokens"])
    if not options.condition_on_previous_text or result.temperature > 0.5:
        state.prompt_reset_since = len(state.all_tokens)
