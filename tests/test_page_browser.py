"""The page in a real browser: Debian's Chromium driven by Playwright, a real Streamlit server,
the real microphone server hearing a PulseAudio virtual microphone, real speech, tiny.en.

Each state is saved as a full-page screenshot, at 1280x800 and as a 400-px-wide phone view,
under artifacts/page/ (look at them: the layout must be clean in both).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from busy_cores import busy_cores
from playwright.sync_api import Browser, Page, expect, sync_playwright
from speech import REPO, clip, normalize, wer
from virtual_mic import ServerProcess, VirtualMic, free_port, wait_for

PAGE = "menny_the_sonic_whisperer.py"
PAGE_PORTS = range(18800, 18900)
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "artifacts" / "page"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 400, "height": 800}
# Failure guards for a loaded 2-core machine, not speed requirements.
START_TIMEOUT_S = 120
TRANSCRIPT_TIMEOUT_MS = 300_000
UI_TIMEOUT_MS = 60_000

UPLOAD_CLIP = clip("jfk.flac")
SERVER_CLIP = clip("librivox_sns01_0870.wav")
BROWSER_CLIP = clip("ls_1272-128104-0000.wav")
# 26.7 s of fast, then slow speech; its last sentence ends with "thanks" 25.3 s in (tiny.en's
# word timings), 1.4 s before the clip does.
LONG_CLIP = clip("mfa_acoustic_corpus.wav")
LONG_CLIP_LAST_SENTENCE = "and that should be all"
LONG_CLIP_LAST_WORD_END_S = 25.3
# Issue 20: live words within 4 s of the voice on a machine with a core busy elsewhere.
BUSY_MACHINE_LAG_S = 4.0  # Chromium's fake microphone plays it in a loop
# tiny.en gets these clips right but for a word at most; a browser recording may also catch the
# loop's restart, which adds a word or two.
MAX_WER = 15.0

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    f"--use-file-for-fake-audio-capture={BROWSER_CLIP.path}",
]


class PageProcess:
    """`streamlit run menny_the_sonic_whisperer.py` as a child process, as scripts/start runs it."""

    def __init__(self, server_url: str, log_path: Path, model: str = "tiny.en") -> None:
        self.port = free_port(PAGE_PORTS)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # Its library in a folder of its own, beside its log.
        env = {**os.environ, "MENNY_MODEL": model, "MENNY_SERVER_URL": server_url}
        env["XDG_DATA_HOME"] = str(log_path.parent)
        env.pop("MENNY_TOKEN", None)
        command = [
            sys.executable, "-m", "streamlit", "run", PAGE, "--server.headless", "true",
            "--server.address", "127.0.0.1", "--server.port", str(self.port),
            "--browser.gatherUsageStats", "false",
        ]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_healthy(self) -> PageProcess:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{self.url}/_stcore/health", timeout=5).status_code == 200
            return False

        wait_for(healthy, f"streamlit on port {self.port}", START_TIMEOUT_S, 0.2)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser, tmp_path: Path) -> Iterator[Callable[[str], Page]]:
    """open_page(server_url): starts the page's Streamlit server and opens it in a new tab."""
    processes: list[PageProcess] = []
    contexts = []

    def start(server_url: str) -> Page:
        streamlit = PageProcess(server_url, tmp_path / f"streamlit{len(processes)}.log")
        processes.append(streamlit)
        streamlit.wait_until_healthy()
        context = browser.new_context(viewport=DESKTOP)
        contexts.append(context)
        context.grant_permissions(["microphone"], origin=streamlit.url)
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.goto(streamlit.url)
        expect(page.get_by_role("heading", name="Menny, the Sonic Whisperer")).to_be_visible()
        return page

    yield start
    for context in contexts:
        context.close()
    for streamlit in processes:
        streamlit.stop()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def save_screenshots(page: Page, name: str) -> None:
    """Full-page screenshots at 1280x800 and 400 px wide; the phone view must not scroll sideways.

    Streamlit scrolls inside its own container, so the viewport is made as tall as the content
    for the shot (a plain full_page shot would cut the page at the window's height).
    """
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for suffix, viewport in (("", DESKTOP), ("-phone", PHONE)):
        page.set_viewport_size(viewport)
        page.wait_for_timeout(500)  # let the layout settle at the new width
        height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
        overflow = page.evaluate(
            "() => Math.max(...[...document.querySelectorAll('[data-testid=stMain], body')]"
            ".map(e => e.scrollWidth - e.clientWidth))"
        )
        assert overflow <= 0, f"{name}: the page is {overflow} px wider than the {viewport['width']}-px window"
        page.set_viewport_size({"width": viewport["width"], "height": max(viewport["height"], height)})
        page.wait_for_timeout(300)
        page.screenshot(path=ARTIFACTS / f"{name}{suffix}.png", full_page=True)
    page.set_viewport_size(DESKTOP)


LIBRARY_TRANSCRIPT = '[class*="st-key-menny-clip-"] .menny-transcript'  # not the one being made


def transcripts(page: Page, count: int = 1) -> list[str]:
    """The transcripts in the page's library once there are `count` of them, newest first."""
    page.wait_for_function(
        f"document.querySelectorAll('{LIBRARY_TRANSCRIPT}').length >= {count}", timeout=TRANSCRIPT_TIMEOUT_MS
    )
    return page.locator(LIBRARY_TRANSCRIPT).all_inner_texts()


def spoken_text(transcript: str) -> str:
    """A transcript's words without the segment times ("0:00.0 → 0:08.1") that start its lines."""
    return " ".join(re.sub(r"^\s*[\d:.]+ → [\d:.]+", "", line) for line in transcript.splitlines())


def test_upload_jfk_shows_transcript_waveform_and_spectrogram(open_page) -> None:
    page = open_page(closed_port_url())
    page.get_by_role("tab", name="Upload").click()
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(UPLOAD_CLIP.path)
    [transcript] = transcripts(page)
    assert wer([UPLOAD_CLIP.transcript], [spoken_text(transcript)]) <= MAX_WER, transcript
    card = page.locator('[class*="st-key-menny-clip-"]')
    expect(card.locator("audio")).to_have_count(1)
    expect(card.locator('[data-testid="stImage"] img')).to_have_count(2)
    expect(card.get_by_role("button", name="SRT")).to_be_visible()
    expect(card).to_contain_text("language: English")
    # Word timings are on: each word tells its time on hover, and a click plays from there.
    word = card.locator(".menny-word", has_text="country").last
    assert "–" in word.get_attribute("title")
    word.click()
    start = float(word.get_attribute("data-start"))
    assert card.locator("audio").evaluate("a => a.currentTime") >= start - 0.05
    save_screenshots(page, "1-upload-jfk")


def test_record_through_the_server_with_the_virtual_microphone(
    open_page, audio_server: Callable[..., ServerProcess], virtual_mic: VirtualMic
) -> None:
    server = audio_server()
    page = open_page(server.url)
    expect(page.get_by_text("Records this computer's microphone")).to_be_visible()
    page.get_by_role("button", name="Record").click()
    expect(page.get_by_text("Recording", exact=True)).to_be_visible()
    speaking = threading.Thread(target=virtual_mic.play, args=(SERVER_CLIP.path,))
    speaking.start()
    try:
        # Live feedback while it speaks: the level meter moves and the waveform so far appears.
        expect(page.get_by_text("dBFS")).to_be_visible()
        expect(page.locator('[data-testid="stImage"] img')).to_have_count(2)  # the avatar and the live waveform
        wait_for(lambda: server.client.get("/status").json()["elapsed_s"] > 4, "4 s of recording")
        page.wait_for_timeout(1000)  # for the next poll to draw them
        save_screenshots(page, "2a-server-recording")
    finally:
        speaking.join()
    page.get_by_role("button", name="Stop").click()
    [transcript] = transcripts(page)
    assert wer([SERVER_CLIP.transcript], [spoken_text(transcript)]) <= MAX_WER, transcript
    expect(page.locator('[class*="st-key-menny-clip-"]')).to_contain_text("server microphone")
    expect(page.get_by_role("button", name="Record")).to_be_visible()
    save_screenshots(page, "2b-server-transcript")


def test_live_transcript_while_recording_through_the_server(
    open_page, audio_server: Callable[..., ServerProcess], virtual_mic: VirtualMic
) -> None:
    server = audio_server()
    page = open_page(server.url)
    page.get_by_role("button", name="Record").click()
    expect(page.get_by_text("Recording", exact=True)).to_be_visible()
    speaking = threading.Thread(target=virtual_mic.play, args=(SERVER_CLIP.path,))
    speaking.start()
    try:
        # Confirmed words come while the server still records: "Dashwood" is said in the first 2 s.
        confirmed = page.locator(".menny-live-confirmed")
        expect(confirmed).to_contain_text(re.compile("dashwood", re.IGNORECASE), timeout=TRANSCRIPT_TIMEOUT_MS)
        assert server.client.get("/status").json()["recording"]
        save_screenshots(page, "2c-server-live-transcript")
    finally:
        speaking.join()
    # Still before Stop, the pause after the clip confirms the rest of it.
    wait_for(
        lambda: wer([SERVER_CLIP.transcript], [confirmed.inner_text()]) <= MAX_WER,
        "the whole clip in the live transcript",
        TRANSCRIPT_TIMEOUT_MS / 1000,
        interval_s=0.5,
    )
    page.get_by_role("button", name="Stop").click()
    [transcript] = transcripts(page)
    assert wer([SERVER_CLIP.transcript], [spoken_text(transcript)]) <= MAX_WER, transcript
    # The final transcript has replaced the live one.
    expect(page.locator(".menny-live")).to_have_count(0)


def reaches_the_end(text: str, last_sentence: str) -> bool:
    """Whether the text's last few words are the sentence's, but for one misheard or missing."""
    expected = normalize(last_sentence).split()
    tail = normalize(text).split()[-len(expected) - 2 :]
    matcher = difflib.SequenceMatcher(a=expected, b=tail, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) >= len(expected) - 1


def test_live_words_keep_up_with_a_long_clip_while_another_program_takes_a_core(
    open_page, audio_server: Callable[..., ServerProcess], virtual_mic: VirtualMic
) -> None:
    """A person stops the recording 4 s after their last word: by then the live view must show
    the last sentence, though another program keeps one of the two cores busy throughout."""
    server = audio_server()
    page = open_page(server.url)
    page.get_by_role("button", name="Record").click()
    expect(page.get_by_text("Recording", exact=True)).to_be_visible()
    live = page.locator(".menny-live")
    shown: list[tuple[float, str]] = []  # (seconds after the last word, the live view's text)
    with busy_cores(1):
        speaking_from = time.monotonic()
        speaking = threading.Thread(target=virtual_mic.play, args=(LONG_CLIP.path,))
        speaking.start()
        stop_at = speaking_from + LONG_CLIP_LAST_WORD_END_S + BUSY_MACHINE_LAG_S
        while time.monotonic() < stop_at:
            shown.append((time.monotonic() - stop_at + BUSY_MACHINE_LAG_S, live.inner_text()))
            page.wait_for_timeout(200)
        shown.append((BUSY_MACHINE_LAG_S, live.inner_text()))
        lag_caption = page.get_by_text(re.compile(r"behind your voice")).inner_text()
        page.get_by_role("button", name="Stop").click()
        speaking.join()
    history = "\n".join(f"{at:+6.1f} s  {text}" for at, text in shown[-25:])
    assert reaches_the_end(shown[-1][1], LONG_CLIP_LAST_SENTENCE), f"{lag_caption}\n{history}"
    [transcript] = transcripts(page)
    assert wer([LONG_CLIP.transcript], [spoken_text(transcript)]) <= 2 * MAX_WER, transcript


def test_record_in_the_browser_with_audio_input(open_page) -> None:
    page = open_page(closed_port_url())
    page.get_by_role("tab", name="Browser mic").click()
    recorder = page.locator('[data-testid="stAudioInput"]')
    recorder.get_by_role("button", name="Record").click()
    # Record the clip once through (the fake microphone starts it when the page opens it).
    page.wait_for_timeout(int((BROWSER_CLIP.duration + 0.3) * 1000))
    recorder.get_by_role("button", name="Stop recording").click()
    [transcript] = transcripts(page)
    text = spoken_text(transcript)
    assert wer([BROWSER_CLIP.transcript], [text]) <= MAX_WER, transcript
    expect(page.locator('[class*="st-key-menny-clip-"]')).to_contain_text("browser microphone")
    save_screenshots(page, "3-browser-recording")


def test_stopped_server_is_reported_with_the_command_to_start_it(
    open_page, audio_server: Callable[..., ServerProcess]
) -> None:
    server = audio_server()
    page = open_page(server.url)
    expect(page.get_by_role("button", name="Record")).to_be_visible()
    server.stop()
    # The recorder panel polls the server, so the message comes without touching the page.
    warning = page.locator('[data-testid="stAlert"]', has_text="not running")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("record in the browser")
    expect(page.locator('[data-testid="stCode"]')).to_contain_text(f"audio_server.py --port {server.port}")
    save_screenshots(page, "4-server-stopped")


class StartScript:
    """`scripts/start` as a person runs it, on free ports, hearing the virtual microphone, with
    its data (clips and library) in `data_dir`."""

    def __init__(self, env: dict[str, str], log_path: Path, page_port: int, server_port: int) -> None:
        self.page_port, self.server_port = page_port, server_port
        self.url = f"http://127.0.0.1:{page_port}"
        self.server_url = f"http://127.0.0.1:{server_port}"
        self.log_path = log_path
        env = {**env, "MENNY_PAGE_PORT": str(page_port), "MENNY_SERVER_PORT": str(server_port)}
        self.runs = self.log().count("Menny is running") if log_path.exists() else 0
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["bash", "scripts/start"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_running(self) -> StartScript:
        def running() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"scripts/start exited with {self.proc.returncode}:\n{self.log()}")
            return self.log().count("Menny is running") > self.runs

        wait_for(running, "scripts/start", START_TIMEOUT_S, 0.2)
        return self

    def server_pid(self) -> int:
        """The microphone server it started (it tells the server where its page lives)."""
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                words = cmdline.read_bytes().split(b"\0")
                if b"audio_server.py" in words and f"http://127.0.0.1:{self.page_port}".encode() in words:
                    return int(cmdline.parent.name)
        raise RuntimeError("no microphone server of this scripts/start is running")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # as Ctrl-C: it stops the server and the page
            self.proc.wait(60)


def start_script(env: dict[str, str], log_path: Path, ports: tuple[int, int] | None = None) -> StartScript:
    """scripts/start on `ports` (page, server), or on free ones: another test session may take a
    port between the choice and the start, so a start that finds one taken tries others."""
    for _attempt in range(5):
        chosen = ports or (random.choice(_free(PAGE_PORTS)), random.choice(_free(range(18700, 18765))))
        try:
            return StartScript(env, log_path, *chosen).wait_until_running()
        except RuntimeError as error:
            if ports or "already in use" not in str(error):
                raise
    raise RuntimeError("no free ports for scripts/start")


def _free(ports: range) -> list[int]:
    free = []
    for port in ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                free.append(port)
    return free


def search(page: Page, words: str) -> None:
    box = page.get_by_placeholder("Words that were said…")
    box.fill(words)
    box.press("Enter")


def test_library_and_clips_survive_reloads_restarts_and_a_killed_server(
    browser: Browser, virtual_mic: VirtualMic, tmp_path: Path
) -> None:
    env = {**virtual_mic.env(), "XDG_DATA_HOME": str(tmp_path / "data"), "MENNY_MODEL": "tiny.en"}
    env.pop("MENNY_TOKEN", None)
    env.pop("MENNY_SERVER_URL", None)
    app = start_script(env, tmp_path / "start.log")
    context = browser.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.goto(app.url)
        page.get_by_role("tab", name="Upload").click()
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(UPLOAD_CLIP.path)
        [transcript] = transcripts(page)
        assert "fellow" in transcript.lower()

        # A reload: the transcript is still there, and search finds it.
        page.reload()
        assert transcripts(page) == [transcript]
        search(page, "fellow")
        expect(page.locator(LIBRARY_TRANSCRIPT)).to_have_count(1)
        search(page, "zebra")
        expect(page.get_by_text("No transcript holds “zebra”")).to_be_visible()
        expect(page.locator(LIBRARY_TRANSCRIPT)).to_have_count(0)
        search(page, "")

        # kill -9 of the server mid-recording: the page stays up and says so; scripts/start
        # restarts the server, and the recording appears in the page's list of its clips.
        page.get_by_role("tab", name="Server mic").click()
        page.get_by_role("button", name="Record").click()
        expect(page.get_by_text("Recording", exact=True)).to_be_visible()
        virtual_mic.play(SERVER_CLIP.path)
        server = httpx.Client(base_url=app.server_url, timeout=30)
        clip_id = server.get("/status").json()["clip_id"]
        os.kill(app.server_pid(), signal.SIGKILL)
        page.wait_for_selector('[data-testid="stAlert"]:has-text("not running")', timeout=UI_TIMEOUT_MS)
        wait_for(lambda: "restarting it" in app.log(), "scripts/start to restart the server", START_TIMEOUT_S)
        wait_for(lambda: _answers(server), "the restarted server", START_TIMEOUT_S, 0.2)
        [kept] = server.get("/clips").json()
        assert kept["id"] == clip_id and kept["duration_s"] > SERVER_CLIP.duration
        clips = page.get_by_text("Clips on the server (1)")
        clips.click()
        expect(page.locator(f'[class*="st-key-menny-server-clip-{clip_id}"]')).to_be_visible()
        expect(page.locator('[data-testid="stAlert"]', has_text="not running")).to_have_count(0)
        assert page.get_by_role("heading", name="Menny, the Sonic Whisperer").is_visible()
        save_screenshots(page, "5-server-back-with-its-clip")

        # Transcribe it from the list: it links to its transcript.
        page.locator(f'[class*="st-key-menny-server-clip-{clip_id}"]').get_by_role("button", name="Transcribe").click()
        assert len(transcripts(page, 2)) == 2
        server.close()

        # scripts/start stopped and started again: the library is still there.
        app.stop()
        app = start_script(env, tmp_path / "start.log", (app.page_port, app.server_port))
        page.goto(app.url)
        assert transcript in transcripts(page, 2)
        search(page, "fellow")
        expect(page.locator(LIBRARY_TRANSCRIPT)).to_have_count(1)
        save_screenshots(page, "6-library-after-restart")
    finally:
        context.close()
        app.stop()


def _answers(client: httpx.Client) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return client.get("/health").status_code == 200
    return False
