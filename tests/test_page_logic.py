"""The page's logic through Streamlit's AppTest: real engine (tiny.en), real speech, no browser.

What a person sees in a real browser is covered by test_page_browser.py.
"""

from __future__ import annotations

import json
import re
import socket
import time

import numpy as np
import pytest
from checkpoint_files import FAMILIES, seeded_weights, write_openai_pt, write_transformers_folder
from fake_hub import FakeHub, hub_at
from speech import REPO, clip, wer
from streamlit.testing.v1 import AppTest
from virtual_mic import wait_for

from menny.page.library import Library
from menny.wav import wav_bytes
from whisper.audio import load_audio

PAGE = str(REPO / "menny_the_sonic_whisperer.py")
# Generous: a guard against a hung run on a loaded 2-core machine, not a speed requirement.
RUN_TIMEOUT_S = 600
DEV_CLIP = "ls_1272-128104-0000.wav"  # LibriSpeech dev-clean
# tiny.en's word error rate on this clip is 0 %; the margin allows for a word or so.
MAX_WER = 10.0


def closed_port_url() -> str:
    """A URL where nothing listens (the port was free a moment ago; nothing here takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch, tmp_path) -> AppTest:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("MENNY_MODEL", "tiny.en")
    monkeypatch.setenv("MENNY_SERVER_URL", closed_port_url())
    monkeypatch.delenv("MENNY_TOKEN", raising=False)
    app = AppTest.from_file(PAGE, default_timeout=RUN_TIMEOUT_S).run()
    assert not app.exception
    return app


def finish(app: AppTest) -> AppTest:
    """Reruns the page until its transcriptions (made in a thread) are done, as the page's own
    polling would; then once more, to show them."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while "work" in app.session_state and app.session_state["work"].busy:
        assert time.monotonic() < deadline, "the transcription did not finish"
        time.sleep(0.2)
        app.run()
    return app.run()


def downloaded(app: AppTest) -> list[str]:
    """Reruns the page while the sidebar shows a model's download, as the bar's own polling would;
    returns what the bar said on the way."""
    said = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while bars := app.sidebar.get("progress"):
        assert time.monotonic() < deadline, "the download did not finish"
        said.append(bars[0].proto.text)
        time.sleep(0.1)
        app.run()
    return said


def history(app: AppTest) -> list:
    """The library's transcripts, newest first."""
    finish(app)
    return Library(app.session_state["work"].library.folder).transcripts() if "work" in app.session_state else []


def messages(elements) -> str:
    return "\n".join(element.value for element in elements)


def test_dev_clip_upload_is_transcribed_within_the_engines_wer(page: AppTest) -> None:
    reference = clip(DEV_CLIP)
    page.file_uploader(key="uploads").upload(DEV_CLIP, reference.path.read_bytes(), "audio/wav").run()
    assert not page.exception
    assert not page.error, messages(page.error)
    [record] = history(page)
    assert wer([reference.transcript], [record.text]) <= MAX_WER, record.text
    assert record.language == "en"
    assert record.duration_s == pytest.approx(reference.duration, abs=0.05)
    # The result view: the transcript, the player and both pictures, the four downloads.
    [transcript] = [html for html in page.get("html") if 'class="menny-transcript"' in html.proto.body]
    assert "apostle" in transcript.proto.body.lower()
    assert len(page.get("audio")) == 1
    assert len(page.image) >= 3  # the avatar, the waveform, the spectrogram
    assert {button.proto.label for button in page.get("download_button")} == {"TXT", "SRT", "VTT", "JSON"}
    assert "-->" in record.export("srt") and record.export("vtt").startswith("WEBVTT")
    assert json.loads(record.export("json"))["text"] == record.result["text"]
    # Rerunning the page (any widget change) must not transcribe the same upload again.
    page.run()
    assert len(history(page)) == 1


def test_several_uploads_each_get_their_own_result_newest_first(page: AppTest) -> None:
    first, second = clip("ps_cards_001.wav"), clip("ps_goforward.flac")
    page.file_uploader(key="uploads").set_value(
        [(first.file, first.path.read_bytes(), "audio/wav"), (second.file, second.path.read_bytes(), "audio/flac")]
    ).run()
    assert not page.exception
    assert [record.name for record in history(page)] == [second.file, first.file]
    for record, expected in zip(history(page), (second, first)):
        assert wer([expected.transcript], [record.text]) <= 34.0, record.text  # 3- and 4-word clips
    page.button(key="delete_all").click().run()
    assert history(page) == []


def test_unreadable_upload_gets_a_readable_error(page: AppTest) -> None:
    page.file_uploader(key="uploads").upload("notes.mp3", b"these are not the sounds you are looking for", "audio/mpeg")
    page.run()
    assert not page.exception
    text = messages(finish(page).error)
    assert "notes.mp3" in text and "Could not read" in text and text.count("WAV") == 1, text
    assert "Traceback" not in text
    assert history(page) == []


def test_empty_browser_recording_says_what_to_do(page: AppTest) -> None:
    page.get("audio_input")[0].upload("recording.wav", wav_bytes(np.zeros(0, dtype=np.float32)))
    page.run()
    assert not page.exception
    text = messages(finish(page).error)
    assert "holds no sound" in text and "microphone" in text, text
    assert history(page) == []


def test_server_down_names_the_command_and_the_browser_microphone(page: AppTest) -> None:
    text = messages(page.warning)
    assert "not running" in text and ".venv/bin/python audio_server.py --port" in text, text
    assert "record in the browser" in text
    assert any("audio_server.py" in code.value for code in page.code)


def test_missing_model_is_explained_and_nothing_breaks(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("MENNY_MODEL", str(tmp_path / "no-such-model"))
    monkeypatch.setenv("MENNY_SERVER_URL", closed_port_url())
    app = AppTest.from_file(PAGE, default_timeout=RUN_TIMEOUT_S).run()
    assert not app.exception
    assert "could not be loaded" in messages(app.error)
    assert "python -m whisper.prepare" in messages(app.error)
    reference = clip("ps_goforward.flac")
    app.file_uploader(key="uploads").upload(reference.file, reference.path.read_bytes(), "audio/flac").run()
    assert not app.exception
    assert "no model is loaded" in messages(finish(app).error)


def test_device_choice_is_remembered_and_server_clips_are_listed_transcribed_and_deleted(
    monkeypatch: pytest.MonkeyPatch, tmp_path, audio_server, virtual_mic
) -> None:
    server = audio_server()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("MENNY_MODEL", "tiny.en")
    monkeypatch.setenv("MENNY_SERVER_URL", server.url)
    monkeypatch.delenv("MENNY_TOKEN", raising=False)
    visit = AppTest.from_file(PAGE, default_timeout=RUN_TIMEOUT_S).run()
    picker = visit.selectbox(key="input_device")
    assert {"pulse", "default (system default)"} <= set(picker.options)
    picker.set_value("pulse").run()
    # Recorded from the chosen input, through the page's Record button.
    visit.button(key="server_record").click().run()
    assert server.client.get("/status").json()["device"] == "pulse"
    virtual_mic.play(clip("ps_goforward.flac").path)
    visit.run()  # the live view, with its Stop button
    visit.button(key="server_stop").click().run()
    [record] = history(visit)
    assert record.source == "server microphone" and "forward" in record.text.lower()
    clip_id = record.clip_id
    assert [c["id"] for c in server.client.get("/clips").json()] == [clip_id]
    assert "live_transcript" not in visit.session_state  # stopped on Stop, to free the model

    # A later visit: the same input is chosen, and the clip is listed with its buttons.
    again = AppTest.from_file(PAGE, default_timeout=RUN_TIMEOUT_S).run()
    assert again.selectbox(key="input_device").value == "pulse"
    assert any(e.label == "Clips on the server (1)" for e in again.expander)
    assert [b.key for b in again.button if b.key.startswith("transcribe-")] == []
    # Transcribed: the clip links to its transcript, which the library then shows alone.
    again.button(key=f"show-{clip_id}").click().run()
    assert again.session_state["library_focus"] == record.uid
    assert [b.label for b in again.button if b.key == "library_show_all"] == ["Show all transcripts"]
    again.button(key=f"delete-{clip_id}").click().run()
    assert server.client.get("/clips").json() == []
    assert not again.exception


def test_a_long_upload_shows_its_progress_and_cancel_keeps_what_is_done(page: AppTest) -> None:
    speech = load_audio(clip("librivox_sns01_0870.wav").path)
    long = np.concatenate([speech] * (150 * 16000 // speech.size + 1))  # about 2.5 minutes: 5+ windows
    page.file_uploader(key="uploads").upload("long.wav", wav_bytes(long), "audio/wav").run()
    assert not page.exception
    assert any("Transcribing “long.wav”" in m.value for m in page.markdown)
    # The audio done so far and the seconds spent, once the file is read.
    wait_for(lambda: any(" of 2:" in bar.proto.text for bar in page.run().get("progress")), "progress", 60, 0.2)
    assert any(re.search(r"transcribed · \d+ s$", bar.proto.text) for bar in page.get("progress"))
    page.button(key="cancel_work").click().run()
    [record] = history(page)
    assert 0 < record.cancelled_at_s < record.duration_s and record.text
    assert any("cancelled at" in caption.value for caption in page.caption)


def test_model_box_lists_models_on_this_computer_and_explains_one_it_cannot_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """An openai-whisper .pt chosen as the model is converted, then listed by its path; a repo id
    that cannot be fetched gets a message naming what to do."""
    checkpoint = write_openai_pt(tmp_path / "mine.pt", FAMILIES["english"], seeded_weights("english"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MENNY_MODEL", str(checkpoint))
    monkeypatch.setenv("MENNY_SERVER_URL", closed_port_url())
    app = AppTest.from_file(PAGE, default_timeout=RUN_TIMEOUT_S).run()
    assert not app.exception and not app.error
    monkeypatch.setenv("MENNY_MODEL", "tiny.en")
    box = next(box for box in app.run().selectbox if box.label == "Model")
    assert box.options[:2] == ["tiny.en", "base"] and "mine.pt (local)" in box.options
    # AppTest cannot type a new option into a select box; the page's default model is one too.
    monkeypatch.setenv("MENNY_MODEL", "menny-test/not-on-this-computer")
    app = AppTest.from_file(PAGE, default_timeout=RUN_TIMEOUT_S).run()
    downloaded(app)
    assert not app.exception
    box = next(box for box in app.selectbox if box.label == "Model")
    assert box.value == "menny-test/not-on-this-computer"
    assert "menny-test/not-on-this-computer (Hugging Face)" in box.options
    text = messages(app.error)
    assert "could not be loaded" in text and "cannot get 'menny-test/not-on-this-computer'" in text, text
    assert "hf download menny-test/not-on-this-computer" in text


def test_a_model_from_hugging_face_shows_its_download_then_loads(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A repo id not on this computer as the model: the sidebar shows the bytes coming from (a
    stand-in for) the Hub, then the conversion; then the model is loaded (English only, so the
    language box is off) and listed."""
    source = write_transformers_folder(tmp_path / "english", FAMILIES["english"], seeded_weights("english"))
    files = {name: source / name for name in ("config.json", "model.safetensors")}
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MENNY_MODEL", "menny-test/page-english")
    monkeypatch.setenv("MENNY_SERVER_URL", closed_port_url())
    with FakeHub({"menny-test/page-english": files}, pause_s=0.05) as hub, hub_at(hub.url, tmp_path / "hub"):
        app = AppTest.from_file(PAGE, default_timeout=RUN_TIMEOUT_S).run()
        said = downloaded(app)
    assert not app.exception and not app.error, messages(app.error)
    assert any(re.fullmatch(r"Downloading menny-test/page-english: \d+ [kM]?B of 8 MB", text) for text in said), said
    language = next(box for box in app.selectbox if box.label == "Language")
    assert language.disabled
    box = next(box for box in app.selectbox if box.label == "Model")
    assert box.value == "menny-test/page-english" and "menny-test/page-english (Hugging Face)" in box.options
