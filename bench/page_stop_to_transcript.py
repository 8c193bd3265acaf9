"""The page's latency: from pressing Stop to the transcript on the screen, recording through the
microphone server, in a real browser.

    .venv/bin/python bench/page_stop_to_transcript.py [--runs 5] [--model base] [--seconds 10]
                                                      [--screenshot images/screenshot.png]

Everything is real, as in tests/test_page_browser.py (whose helpers it uses): a PulseAudio
virtual microphone, `audio_server.py`, `streamlit run menny_the_sonic_whisperer.py`, Debian's
Chromium. Each run presses Record, plays a clip into the microphone, waits until the server has
recorded `--seconds`, presses Stop and waits for the new transcript; the page's own settings
(word timings on, greedy decoding). One warm-up run first, not counted. Prints each run and
the median, and how much of it the engine's transcribe() took (the page shows that time).
With --screenshot, it then uploads jfk.flac and saves the page for the README.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402
from speech import clip  # noqa: E402
from test_page_browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PageProcess, transcripts  # noqa: E402
from virtual_mic import ServerProcess, VirtualMic, wait_for  # noqa: E402

CLIP = clip("lj_LJ001-0001.flac")  # 9.65 s of speech


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="base")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each recording")
    parser.add_argument("--screenshot", type=Path, help="save the page with jfk.flac transcribed here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="menny-bench-") as tmp, VirtualMic(Path(tmp) / "mic") as mic:
        server = ServerProcess(Path(tmp) / "clips", Path(tmp) / "server.log", mic.env()).wait_until_healthy()
        page_process = PageProcess(server.url, Path(tmp) / "streamlit.log", model=args.model).wait_until_healthy()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport=DESKTOP)
                page.set_default_timeout(300_000)
                page.goto(page_process.url)
                page.get_by_role("button", name="Record").wait_for()
                times, engine_times = [], []
                for run in range(args.runs + 1):
                    page.get_by_role("button", name="Record").click()
                    page.get_by_text("Recording", exact=True).wait_for()
                    speaking = threading.Thread(target=mic.play, args=(CLIP.path,))
                    speaking.start()
                    wait_for(lambda: server.client.get("/status").json()["elapsed_s"] >= args.seconds, "recording")
                    started = time.perf_counter()
                    page.get_by_role("button", name="Stop").click()
                    transcripts(page, run + 1)
                    elapsed = time.perf_counter() - started
                    speaking.join()
                    card = page.locator('[class*="st-key-menny-clip-"]').first
                    card.get_by_text("transcribed in").wait_for()
                    caption = card.inner_text()
                    engine = float(re.search(r"transcribed in ([\d.]+) s", caption).group(1))
                    label = "warm-up" if run == 0 else f"run {run}"
                    print(f"{label}: Stop -> transcript {elapsed:.2f} s (transcribe() {engine:.1f} s)", flush=True)
                    if run:
                        times.append(elapsed)
                        engine_times.append(engine)
                median = statistics.median(times)
                print(
                    f"median of {len(times)} ({args.model}, {args.seconds:g} s recordings): {median:.2f} s "
                    f"(transcribe() alone: {statistics.median(engine_times):.1f} s)"
                )
                if args.screenshot:
                    save_screenshot(page, args.screenshot)
                browser.close()
        finally:
            page_process.stop()
            server.stop()


def save_screenshot(page, path: Path) -> None:
    page.get_by_role("button", name="Delete all").click()
    page.get_by_role("button", name="Delete them all").click()
    page.get_by_role("tab", name="Upload").click()
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(clip("jfk.flac").path)
    transcripts(page)
    page.locator(".menny-word", has_text="country").first.hover()  # show a word's time
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": DESKTOP["width"], "height": height})
    page.wait_for_timeout(1000)
    page.screenshot(path=path, full_page=True)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
