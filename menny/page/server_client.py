"""A small typed client for the microphone server (audio_server.py), for the page.

Every failure becomes a `ServerError` whose message says what to do; a server that is
not running at all is a `ServerUnavailable`, so the page can offer the browser microphone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import requests

DEFAULT_PORT = 8765
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
# Status polls must never stall the page; fetching a long clip may take a moment.
QUICK_TIMEOUT_S = 2.0
TRANSFER_TIMEOUT_S = 60.0


def default_url() -> str:
    """The server URL: MENNY_SERVER_URL (set by scripts/start) or the default port."""
    return os.environ.get("MENNY_SERVER_URL", DEFAULT_URL).rstrip("/")


def start_command(url: str) -> str:
    """The command that starts a server answering at `url`, run in Menny's folder."""
    port = urlsplit(url).port or DEFAULT_PORT
    return ".venv/bin/python audio_server.py" + ("" if port == DEFAULT_PORT else f" --port {port}")


class ServerError(RuntimeError):
    """The server answered, but could not do what was asked; the message says why."""


class ServerUnavailable(ServerError):
    """Nothing answers at the server URL."""

    def __init__(self, url: str, reason: str):
        self.url = url
        super().__init__(
            f"The microphone server is not running at {url} ({reason}). "
            f"Start it in a terminal in Menny's folder with `{start_command(url)}` "
            "(or start the server and the page together with `scripts/start`), "
            "or record in the browser instead (the Browser mic tab)."
        )


@dataclass(frozen=True)
class ServerStatus:
    recording: bool
    clip_id: str | None  # the clip being recorded
    elapsed_s: float
    level_dbfs: float  # RMS of the last 100 ms; -100 when idle or silent
    device: str | None
    clip_count: int
    error: str | None  # why recording is impossible now, or a write failure


@dataclass(frozen=True)
class SavedClip:
    clip_id: str
    duration_s: float
    peak_dbfs: float
    error: str | None  # a write failure during the recording
    limit_reached: bool  # the server closed the microphone at its maximum clip length


@dataclass(frozen=True)
class ServerClip:
    """A clip kept on the server (GET /clips)."""

    clip_id: str
    created: datetime
    duration_s: float


@dataclass(frozen=True)
class InputChoice:
    """An input device the server can record from (GET /devices)."""

    index: int
    name: str
    is_default: bool


class ServerClient:
    """Talks to one microphone server; cheap to create per page run.

    A token (MENNY_TOKEN, as the server reads it) is sent when set: a server listening beyond
    this computer requires one.
    """

    def __init__(self, url: str, token: str | None = None):
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get("MENNY_TOKEN")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _request(
        self, method: str, path: str, timeout: float, json: dict | None = None, **params: object
    ) -> requests.Response:
        try:
            response = requests.request(
                method, f"{self.url}{path}", params=params or None, json=json, headers=self._headers, timeout=timeout
            )
        except requests.ConnectionError:
            raise ServerUnavailable(self.url, "nothing answers there") from None
        except requests.Timeout:
            raise ServerUnavailable(self.url, f"no answer within {timeout:g} s") from None
        except requests.RequestException as error:
            raise ServerUnavailable(self.url, str(error)) from None
        if response.status_code >= 400:
            raise ServerError(_error_detail(response))
        return response

    def status(self) -> ServerStatus:
        data = self._request("GET", "/status", QUICK_TIMEOUT_S).json()
        return ServerStatus(
            recording=bool(data["recording"]),
            clip_id=data.get("clip_id"),
            elapsed_s=float(data["elapsed_s"]),
            level_dbfs=float(data["level_dbfs"]),
            device=data.get("device"),
            clip_count=int(data["clip_count"]),
            error=data.get("error"),
        )

    def start(self, device: str | None = None) -> None:
        """Record from `device` (a name), or the server's default input."""
        self._request("POST", "/start", QUICK_TIMEOUT_S, json={"device": device} if device else None)

    def stop(self) -> SavedClip:
        data = self._request("POST", "/stop", TRANSFER_TIMEOUT_S).json()
        return SavedClip(
            clip_id=str(data["id"]),
            duration_s=float(data["duration_s"]),
            peak_dbfs=float(data["peak_dbfs"]),
            error=data.get("error"),
            limit_reached=bool(data.get("limit_reached")),
        )

    def partial_wav(self, clip_id: str, start_frame: int = 0) -> bytes | None:
        """The audio recorded so far in clip `clip_id` from sample `start_frame` on, as WAV;
        None before the first block."""
        response = self._request("GET", "/wav", TRANSFER_TIMEOUT_S, partial="true", start_frame=start_frame)
        # Before any audio arrives the server answers with the latest finished clip instead.
        return response.content if response.headers.get("X-Clip-Id") == clip_id else None

    def clip_wav(self, clip_id: str) -> bytes:
        return self._request("GET", f"/wav/{clip_id}", TRANSFER_TIMEOUT_S).content

    def clips(self) -> list[ServerClip]:
        """The clips kept on the server, newest first."""
        return [
            ServerClip(
                clip_id=str(item["id"]),
                created=datetime.fromisoformat(item["created"]).astimezone(),
                duration_s=float(item["duration_s"]),
            )
            for item in self._request("GET", "/clips", QUICK_TIMEOUT_S).json()
        ]

    def delete_clip(self, clip_id: str) -> None:
        self._request("DELETE", f"/clips/{clip_id}", QUICK_TIMEOUT_S)

    def devices(self) -> list[InputChoice]:
        """The input devices the server sees (it re-scans them, which takes a moment)."""
        return [
            InputChoice(index=int(item["index"]), name=str(item["name"]), is_default=bool(item["is_default"]))
            for item in self._request("GET", "/devices", TRANSFER_TIMEOUT_S).json()
        ]


def _error_detail(response: requests.Response) -> str:
    """The server's own explanation (its {"detail": "..."}) or the HTTP status."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, str) and detail:
        return detail
    request = response.request
    return f"The microphone server answered HTTP {response.status_code} to {request.method} {request.path_url}."
