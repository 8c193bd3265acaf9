"""Menny's application code: `menny.server` runs in the microphone server's process, `menny.page`
in the page's; `menny.wav` (the clip format) is all they share."""
