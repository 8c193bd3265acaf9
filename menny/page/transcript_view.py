"""The transcript as HTML: one line per segment with its time span; with word timings, each
word shows its time on hover, and a click on a word or a time plays the clip from there.

The page wraps each clip's view in a container whose CSS class starts with CARD_CLASS, holding
the audio player; the script finds that player from the clicked element, so several clips on
one page each seek their own audio.
"""

from __future__ import annotations

import html

CARD_CLASS = "st-key-menny-clip-"

STYLE = """
<style>
.menny-transcript { line-height: 1.75; font-size: 1.02rem; }
.menny-segment { margin: 0 0 0.35rem 0; }
.menny-time {
  font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.78rem;
  color: #6b6b80; background: rgba(75, 63, 209, 0.08); border-radius: 0.3rem;
  padding: 0.05rem 0.35rem; margin-right: 0.45rem; cursor: pointer; white-space: nowrap;
}
.menny-word { border-radius: 0.25rem; cursor: pointer; transition: background 0.1s; }
.menny-word:hover { background: rgba(75, 63, 209, 0.18); }
.menny-now { background: rgba(255, 180, 0, 0.45) !important; }
.menny-empty { color: #6b6b80; font-style: italic; }
</style>
"""

SCRIPT = """
<script>
(() => {
  if (window.mennyTranscriptWired) return;
  window.mennyTranscriptWired = true;
  const card = (el) => el.closest('[class*="CARD_CLASS"]');
  document.addEventListener('click', (event) => {
    const target = event.target.closest('.menny-transcript [data-start]');
    const audio = target && card(target) && card(target).querySelector('audio');
    if (!audio) return;
    audio.currentTime = parseFloat(target.dataset.start);
    audio.play();
  });
  // Media events do not bubble, so listen in the capture phase for every player.
  document.addEventListener('timeupdate', (event) => {
    const audio = event.target;
    const box = audio.tagName === 'AUDIO' && card(audio);
    if (!box) return;
    const now = audio.currentTime;
    box.querySelectorAll('.menny-word').forEach((word) => {
      word.classList.toggle('menny-now', !audio.paused && now >= +word.dataset.start && now < +word.dataset.end);
    });
  }, true);
})();
</script>
""".replace("CARD_CLASS", CARD_CLASS)


def clock(seconds: float) -> str:
    """0:07.3 or 1:02:07.3."""
    minutes, secs = divmod(max(seconds, 0.0), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:04.1f}" if hours else f"{minutes}:{secs:04.1f}"


def _words_html(words: list[dict]) -> str:
    spans = []
    for word in words:
        text = word["word"]
        stripped = text.lstrip()
        spans.append(
            html.escape(text[: len(text) - len(stripped)])
            + f'<span class="menny-word" data-start="{word["start"]:.2f}" data-end="{word["end"]:.2f}" '
            f'title="{word["start"]:.2f}–{word["end"]:.2f} s">{html.escape(stripped)}</span>'
        )
    return "".join(spans)


def transcript_html(result: dict, script: bool = True) -> str:
    """Segments with clickable times; words as hoverable, clickable spans when timed. Without
    `script` (a transcript still being made, with no player yet) the clicks do nothing."""
    lines = []
    for segment in result["segments"]:
        words = segment.get("words")
        body = _words_html(words) if words else html.escape(segment["text"].strip())
        lines.append(
            f'<div class="menny-segment"><span class="menny-time" data-start="{segment["start"]:.2f}" '
            f'title="Play from {clock(segment["start"])}">{clock(segment["start"])} → {clock(segment["end"])}</span>'
            f"{body}</div>"
        )
    if not lines:
        lines.append('<div class="menny-empty">No speech heard in this clip.</div>')
    return f'<div class="menny-transcript">{"".join(lines)}</div>{SCRIPT if script else ""}'
