"""Transcribe many files at once: windows of several files encoded and decoded as one batch.

Each file is still transcribed window by window (`transcribe.FileTranscription`), since
where its next window starts depends on how the last one ended.  Batching adds breadth:
the current windows of up to `batch_size` files go through the encoder in one call and
are decoded together, each sequence stopping at its own end of text.  A file that ends
hands its place to the next file.

Windows are decoded together only where their decoding options agree, the prompt
included.  With `condition_on_previous_text=True` each file's later windows carry their
own previous text and so decode alone; batched mode therefore defaults to False, like
faster-whisper's batched pipeline.  With the same options each file's text is the one
`transcribe` gives (the batched arithmetic can at most flip a near-tie).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import mlx.core as mx

from .audio import AudioError
from .decoding import DecodingTask
from .model import Whisper
from .transcribe import (
    AudioInput,
    Features,
    FileTranscription,
    TranscribeOptions,
    audio_features,
    decode_with_fallback,
    decoding_options,
    needs_fallback,
    on_device,
)

AudioSource = AudioInput | Features


def transcribe_stream(
    model: Whisper,
    audios: Iterable[AudioSource],
    options: TranscribeOptions | None = None,
    *,
    batch_size: int = 8,
    device: str | None = None,
) -> Iterator[tuple[int, FileTranscription | AudioError]]:
    """Transcribe audios (paths, file bytes, 16 kHz waveforms or `Features`) as they come,
    and yield `(index, finished FileTranscription)` as each file ends (its `result()`,
    its `duration`), or `(index, AudioError)` for a file that cannot be read.

    `options` default to `batch_options()`'s.  Nothing is kept once yielded, so `audios` may be a
    generator over an archive of any size.  With `device` given, MLX computes on it
    until the generator is exhausted or closed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    return _stream(model, audios, batch_size, options or batch_options(), device)


def batch_options(**keywords: object) -> TranscribeOptions:
    """`transcribe`'s options from its keywords, except that by default a window is not
    prompted with the text before it (as in faster-whisper's batched pipeline)."""
    return TranscribeOptions.from_keywords(**{"condition_on_previous_text": False, **keywords})


def transcribe_batch(
    model: Whisper,
    audios: Sequence[AudioInput],
    *,
    batch_size: int = 8,
    device: str | None = None,
    on_result: Callable[[int, dict], None] | None = None,
    on_error: Callable[[int, AudioError], None] | None = None,
    options: TranscribeOptions | None = None,
    **keywords,
) -> list[dict | None]:
    """Transcribe every audio (path, file bytes or 16 kHz waveform); results in input order.

    Takes `transcribe`'s option keywords, or `options` whole.  `on_result(index, result)` is
    called as each file finishes.  An unreadable file raises its AudioError, unless `on_error(index, error)`
    is given: then that file's result is None and the others go on.
    """
    results: list[dict | None] = [None] * len(audios)
    if options is not None and keywords:
        raise TypeError(f"give the options whole or as keywords, not both ({', '.join(keywords)})")
    options = options or batch_options(**keywords)
    stream = transcribe_stream(model, audios, options, batch_size=batch_size, device=device)
    for index, finished in stream:
        if isinstance(finished, AudioError):
            if on_error is None:
                raise finished
            on_error(index, finished)
            continue
        results[index] = finished.result()
        if on_result is not None:
            on_result(index, results[index])
    return results


def _stream(
    model: Whisper,
    audios: Iterable[AudioSource],
    batch_size: int,
    transcribe_options: TranscribeOptions,
    device: str | None,
) -> Iterator[tuple[int, FileTranscription | AudioError]]:
    def opened() -> Iterator[tuple[int, FileTranscription | AudioError]]:
        # Reading a file and its log-mel (numpy's FFT, which releases the GIL) run in threads
        # a few files ahead: done in turn, they took a third of a batch-16 run on a GPU.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            ahead: deque[tuple[int, AudioInput, Future]] = deque()
            for index, audio in enumerate(audios):
                ahead.append((index, audio, pool.submit(audio_features, audio, model.dims.n_mels)))
                if len(ahead) > 2 * batch_size:
                    yield ready(*ahead.popleft())
            while ahead:
                yield ready(*ahead.popleft())

    def ready(index: int, audio: AudioSource, features: Future) -> tuple[int, FileTranscription | AudioError]:
        try:
            features = features.result()
        except AudioError as error:
            return index, error
        return index, FileTranscription(model, audio, transcribe_options, features=features)

    with on_device(model, device):
        files = opened()
        going: deque[tuple[int, FileTranscription]] = deque()  # files of the last batch, in order
        while True:
            batch: list[tuple[FileTranscription, mx.array]] = []
            kept: deque[tuple[int, FileTranscription]] = deque()
            while len(batch) < batch_size:
                index, job = going.popleft() if going else next(files, (None, None))
                if job is None:
                    break
                if isinstance(job, AudioError):
                    yield index, job
                    continue
                window = job.next_window()
                if window is None:
                    yield index, job
                else:
                    batch.append((job, window))
                    kept.append((index, job))
            if not batch:
                return
            decode_batch(model, batch, transcribe_options)
            going = kept


def decode_batch(model: Whisper, batch: list[tuple[FileTranscription, mx.array]], options: TranscribeOptions) -> None:
    """Decode one window per job, those with equal decoding options together, and hand
    each job its result; a window that needs the temperature fallback retries alone."""
    groups: dict[str, list[tuple[FileTranscription, mx.array]]] = {}
    for job, window in batch:
        groups.setdefault(repr(job.decoding), []).append((job, window))
    fallback = replace(options, temperature=options.temperature[1:])
    for members in groups.values():
        first = members[0][0].decoding
        task = DecodingTask(model, decoding_options(first, options.temperature[0]))
        decoded = task.run(mx.stack([window for _, window in members]))
        for (job, window), result in zip(members, decoded):
            if fallback.temperature and needs_fallback(result, options):
                result = decode_with_fallback(model, window, fallback, job.decoding)
            job.add_result(result)
