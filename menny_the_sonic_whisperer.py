"""Menny, the Sonic Whisperer: the page. Run with `streamlit run menny_the_sonic_whisperer.py`
(or `scripts/start`, which also starts the microphone server).

Three ways to give Menny speech, the transcription under way, and the library of transcripts;
the pieces live in menny/page/.
"""

import streamlit as st

import whisper

# The page transcribes in this process: set it up for the engine before its modules import MLX.
whisper.configure()

from menny.page import library_view, server_view, ui  # noqa: E402
from menny.page.server_client import ServerClient  # noqa: E402

st.set_page_config(page_title="Menny, the Sonic Whisperer", page_icon=str(ui.AVATAR), layout="wide")

ui.header()
settings, model, server_url = ui.sidebar_settings()

server = ServerClient(server_url)
server_status = server_view.server_status(server)
server_tab, browser_tab, upload_tab = server_view.source_tabs(server_up=server_status is not None)
with server_tab:
    server_view.server_tab(server, server_status, model, settings)
with browser_tab:
    ui.browser_tab(model, settings)
with upload_tab:
    ui.upload_tab(model, settings)

ui.work_view()
library_view.library_section()
