"""The page's building blocks without a browser: pictures, transcript HTML, the server client,
decoding, a model's download. The library and transcription jobs: test_page_library.py."""

from __future__ import annotations

import html
import re
import time

import numpy as np
import pytest
from checkpoint_files import FAMILIES, seeded_weights, write_transformers_folder
from fake_hub import FakeHub, hub_at
from speech import clip
from virtual_mic import ServerProcess

from menny.page import model_download, visuals
from menny.page.server_client import ServerClient, ServerError, ServerUnavailable, start_command
from menny.page.transcript_view import clock, transcript_html
from menny.page.transcription import ClipError, TranscriptionSettings, decode
from menny.wav import wav_bytes, wav_samples
from whisper.audio import SAMPLE_RATE, load_audio
from whisper.models import ModelNotFoundError
from whisper.transcribe import TranscribeOptions


def test_waveform_envelope_keeps_every_peak_in_a_bounded_number_of_columns() -> None:
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.5, 0.5, SAMPLE_RATE * 600).astype(np.float32)  # ten minutes
    audio[1_234_567] = 0.99
    audio[7_654_321] = -0.98
    times, low, high = visuals.waveform_envelope(audio)
    assert len(times) <= visuals.MAX_COLUMNS
    assert high.max() == pytest.approx(0.99) and low.min() == pytest.approx(-0.98)
    assert times[0] > 0 and times[-1] < 600 and np.all(np.diff(times) > 0)


def test_short_audio_envelope_is_the_samples_themselves() -> None:
    audio = np.array([0.1, -0.2, 0.3], dtype=np.float32)
    times, low, high = visuals.waveform_envelope(audio)
    assert np.array_equal(low, audio) and np.array_equal(high, audio)
    assert times == pytest.approx(np.array([0.5, 1.5, 2.5]) / SAMPLE_RATE)


def test_spectrogram_is_the_models_log_mel_in_db_averaged_down_for_long_audio() -> None:
    audio = load_audio(clip("jfk.flac").path)
    db = visuals.log_mel_db(audio, n_mels=80)
    assert db.shape == (80, 1100)  # 100 frames a second
    # Whisper keeps 8 decades (80 dB) below the loudest bin.
    assert db.max() - db.min() == pytest.approx(80.0, abs=0.01)
    long_db = visuals.log_mel_db(np.tile(audio, 40), n_mels=80)  # over 7 minutes: two slices
    assert long_db.shape == (80, visuals.MAX_COLUMNS)


def test_mel_axis_centres_rise_through_the_speech_band() -> None:
    centres = visuals.mel_bin_centres_hz(80)
    assert np.all(np.diff(centres) > 0)
    assert 0 < centres[0] < 60 and 7000 < centres[-1] < 8000


def test_figures_render_to_png() -> None:
    audio = load_audio(clip("ps_goforward.flac").path)
    for figure in (visuals.waveform_figure(audio), visuals.spectrogram_figure(audio, 80)):
        png = visuals.figure_png(figure)
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_transcript_html_escapes_text_and_times_each_word() -> None:
    result = {
        "segments": [
            {"start": 0.0, "end": 2.5, "text": " Tom <b>& Jerry", "words": [
                {"word": " Tom", "start": 0.0, "end": 0.4},
                {"word": " <b>&", "start": 0.4, "end": 1.0},
                {"word": " Jerry", "start": 1.0, "end": 2.5},
            ]},
            {"start": 65.0, "end": 3725.25, "text": " No words timed <here>"},
        ]
    }
    page = transcript_html(result)
    assert "<b>&" not in page and html.escape("<b>&") in page and html.escape("<here>") in page
    assert page.count('class="menny-word"') == 3
    assert 'data-start="1.00" data-end="2.50" title="1.00–2.50 s">Jerry</span>' in page
    assert "1:05.0 → 1:02:05.2" in page
    assert "No speech heard" in transcript_html({"segments": []})


def test_clock() -> None:
    assert clock(0) == "0:00.0" and clock(7.34) == "0:07.3" and clock(3600 + 62.5) == "1:01:02.5"


def test_client_for_a_stopped_server_names_the_command_to_start_it() -> None:
    client = ServerClient("http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(ServerUnavailable) as caught:
        client.status()
    message = str(caught.value)
    assert "not running at http://127.0.0.1:9" in message and "audio_server.py --port 9" in message
    assert start_command("http://127.0.0.1:8765") == ".venv/bin/python audio_server.py"


def test_client_against_the_real_server(audio_server, virtual_mic) -> None:
    server: ServerProcess = audio_server()
    client = ServerClient(server.url)
    status = client.status()
    assert not status.recording and status.device and status.error is None
    with pytest.raises(ServerError, match="Not recording"):
        client.stop()
    client.start()
    virtual_mic.play(clip("ps_cards_001.wav").path)
    recording = client.status()
    assert recording.recording and recording.elapsed_s > 0.5 and recording.clip_id
    partial = client.partial_wav(recording.clip_id)
    assert partial is not None and load_audio(partial).size > SAMPLE_RATE // 2
    assert np.array_equal(wav_samples(partial), load_audio(partial))  # read directly, as the live view does
    saved = client.stop()
    assert saved.clip_id == recording.clip_id and saved.duration_s >= recording.elapsed_s
    assert load_audio(client.clip_wav(saved.clip_id)).size == pytest.approx(saved.duration_s * SAMPLE_RATE, abs=1)
    assert client.partial_wav("some-other-clip") is None
    # The clip list, the inputs, recording from a chosen one, deleting.
    [kept] = client.clips()
    assert kept.clip_id == saved.clip_id and kept.duration_s == pytest.approx(saved.duration_s, abs=0.01)
    inputs = client.devices()
    assert "pulse" in [d.name for d in inputs] and sum(d.is_default for d in inputs) <= 1
    client.start("pulse")
    assert client.status().device == "pulse"
    client.stop()
    client.delete_clip(saved.clip_id)
    assert saved.clip_id not in [c.clip_id for c in client.clips()] and len(client.clips()) == 1
    with pytest.raises(ServerError, match="No clip"):
        client.delete_clip(saved.clip_id)


def test_decode_turns_bad_input_into_advice() -> None:
    with pytest.raises(ClipError, match=r"Could not read “notes\.txt”: not a readable audio") as unreadable:
        decode(b"plain text", "notes.txt")
    assert str(unreadable.value).count("WAV") == 1  # the formats are listed once
    with pytest.raises(ClipError, match=r"only 0\.1 s long, too short") as short:
        decode(wav_bytes(np.full(1600, 0.1, dtype=np.float32)), "blip.wav")
    assert "microphone" not in str(short.value)
    with pytest.raises(ClipError, match=r"holds no sound.*microphone is allowed"):
        decode(wav_bytes(np.zeros(0, dtype=np.float32)), "nothing.wav")
    with pytest.raises(ValueError):
        wav_samples(clip("ps_goforward.flac").path.read_bytes())


def test_settings_map_to_transcribe_options() -> None:
    default = TranscriptionSettings().transcribe_options()
    assert default == TranscribeOptions.from_keywords(language=None, task="transcribe", beam_size=None)
    settings = TranscriptionSettings(language="de", task="translate", word_timestamps=True, beam_size=5)
    chosen = settings.transcribe_options()
    assert chosen.word_timestamps
    assert (chosen.decoding.language, chosen.decoding.task, chosen.decoding.beam_size) == ("de", "translate", 5)


def _statuses_until_finished(download: model_download.ModelDownload) -> list[tuple[float, str]]:
    """What the page's bar shows, read more often than the page does, until the end."""
    statuses = []
    deadline = time.monotonic() + 60
    while not download.finished:
        assert time.monotonic() < deadline, "the download did not finish"
        statuses.append(download.progress.status())
        time.sleep(0.02)
    statuses.append(download.progress.status())  # the last, in case the polls missed it
    return list(dict.fromkeys(statuses))


def test_model_download_shows_its_bytes_rising_then_the_conversion(tmp_path, monkeypatch) -> None:
    """huggingface_hub's own download from a stand-in for the Hub, whose bars the page's record
    counts: the bytes rise to the whole, then the conversion; after it the model is here."""
    source = write_transformers_folder(tmp_path / "english", FAMILIES["english"], seeded_weights("english"))
    files = {name: source / name for name in ("config.json", "model.safetensors")}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with FakeHub({"menny-test/page-download": files}) as hub, hub_at(hub.url, tmp_path / "hub"):
        download = model_download.download_of("menny-test/page-download")
        assert model_download.download_of("menny-test/page-download") is download  # one per model
        statuses = _statuses_until_finished(download)
        model_download.take(download)
        assert download.error is None
        assert model_download.download_of("menny-test/page-download") is None  # on this computer now
    fractions = [fraction for fraction, _ in statuses]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0, statuses
    texts = [text for _, text in statuses]
    sizes = [text for text in texts if re.fullmatch(r"Downloading menny-test/page-download: \d+ [kM]?B of 8 MB", text)]
    assert len(sizes) >= 4 and len(set(fractions)) >= 5, statuses
    assert texts[-1] == "Converting menny-test/page-download for this computer (only this once)…"


def test_model_download_without_the_hub_ends_in_what_to_do(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with FakeHub({}) as hub:
        gone = hub.url
    with hub_at(gone, tmp_path / "hub"):
        download = model_download.download_of("menny-test/unreachable")
        _statuses_until_finished(download)
        with pytest.raises(ModelNotFoundError) as error:
            model_download.take(download)
        again = model_download.download_of("menny-test/unreachable")  # a later request tries again
        assert again is not download
        _statuses_until_finished(again)
        with pytest.raises(ModelNotFoundError):
            model_download.take(again)
    assert "cannot get 'menny-test/unreachable' from Hugging Face" in str(error.value)
    assert "hf download menny-test/unreachable --local-dir unreachable" in str(error.value)
