"""Menny, the Sonic Whisperer: the page. Run with `streamlit run menny_the_sonic_whisperer.py`
(or `scripts/start`, which also starts the microphone server).

Three ways to give Menny speech, one result view; the pieces live in menny/ui.py.
"""

import streamlit as st

from menny.page import ui
from menny.page.server_client import ServerClient

st.set_page_config(page_title="Menny, the Sonic Whisperer", page_icon=str(ui.AVATAR), layout="wide")

ui.header()
settings, model, server_url = ui.sidebar_settings()

server = ServerClient(server_url)
server_status = ui.server_status(server)
server_tab, browser_tab, upload_tab = ui.source_tabs(server_up=server_status is not None)
with server_tab:
    ui.server_tab(server, server_status, model, settings)
with browser_tab:
    ui.browser_tab(model, settings)
with upload_tab:
    ui.upload_tab(model, settings)

ui.history_section()
