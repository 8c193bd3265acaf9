"""Menny's microphone server: records this machine's microphone and hands the page clips.

    python audio_server.py [--host 127.0.0.1] [--port 8765] [--device NAME|INDEX]
                           [--data-dir DIR] [--token TOKEN] [--max-clip-seconds 1800]
                           [--max-clips 100] [--max-storage-mb 1024] [--allow-origin URL ...]

It hears the room, so it listens on 127.0.0.1 unless told otherwise; on any other address it
refuses to start without a token (``--token`` or the environment variable ``MENNY_TOKEN``, which
``ps`` cannot show), and then every endpoint except ``/health`` needs the header
``Authorization: Bearer <token>``, checked before the body is read (401). A body over 4096 bytes
gets 413, also unread. ``MENNY_SERVER_HOST`` and ``MENNY_SERVER_PORT`` change the defaults of
``--host`` and ``--port``. API reference: ``/docs``, a page that needs no network.

Clips are 16 kHz mono 16-bit WAV files, written while recording, so a crash loses at most the
last second. Endpoints and their JSON (errors are ``{"detail": "what went wrong and what to
do"}``; a request that fails validation gets 422 with FastAPI's list of problems):

``POST /start``, optional body ``{"device": "pulse"}`` (name, or a part of it) or ``{"device": 3}``
    200 ``{"clip_id": "20250102-130405-123456", "device": "pulse", "sample_rate": 16000,
    "capture_rate": 16000, "max_clip_s": 1800.0}``; 400 body not JSON; 409 already recording;
    422 no such device; 503 no input device or PortAudio missing (the detail says the fix).
``POST /stop``
    200 ``{"id": "20250102-130405-123456", "duration_s": 5.86, "peak_dbfs": -3.1,
    "size_bytes": 187604, "overflows": 0, "limit_reached": false, "device": "pulse",
    "error": null, "url": "/wav/20250102-130405-123456"}``; 409 not recording.
    ``limit_reached``: the microphone was closed at the maximum clip length.
``GET /status``
    200 ``{"recording": true, "clip_id": "...", "elapsed_s": 3.2, "level_dbfs": -23.5,
    "device": "pulse", "clip_count": 4, "overflows": 0, "limit_reached": false,
    "max_clip_s": 1800.0, "error": null}``. ``level_dbfs``: RMS of the last 100 ms
    (-100 when idle or silent); ``overflows``: input blocks PortAudio lost in this recording;
    ``device``: the input in use, or that ``/start`` would use (null if none); ``error``: why
    recording is impossible now, or a write failure during the recording.
``GET /wav`` and ``GET /wav?partial=true[&start_frame=N]``
    ``audio/wav``: the latest finished clip; with ``partial=true`` during a recording, the audio
    recorded so far, from sample ``N`` on (default 0). Header ``X-Clip-Id``. 404 when there is
    none yet.
``GET /wav/{clip_id}``
    ``audio/wav``; 404 unknown clip; 409 still being recorded.
``GET /devices``
    200 ``[{"index": 0, "name": "pulse", "hostapi": "ALSA", "max_input_channels": 32,
    "default_samplerate": 44100.0, "is_default": false}, ...]``
``GET /clips``
    200 ``[{"id": "...", "created": "2025-01-02T13:04:05.123456Z", "duration_s": 5.86,
    "size_bytes": 187604, "url": "/wav/..."}, ...]``, newest first.
``DELETE /clips/{clip_id}``
    204; 404 unknown clip; 409 still being recorded.
``GET /health``
    200 ``{"status": "ok"}``; never needs the token.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from menny.server.api_docs import docs_html
from menny.server.clips import CLIP_ID_PATTERN, ClipBusy, ClipInfo, ClipNotFound, ClipStore
from menny.server.guard import RequestGuard
from menny.server.recorder import (
    AlreadyRecording,
    AudioUnavailable,
    DeviceNotFound,
    FinishedTake,
    InputDevice,
    NotRecording,
    Recorder,
)
from menny.wav import SAMPLE_RATE

log = logging.getLogger("menny.audio_server")

DEFAULT_PORT = 8765
MIN_TOKEN_LENGTH = 16
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # as Host headers name them
PUBLIC_PATHS = ("/health", "/docs", "/openapi.json")  # no token needed: nothing there hears the room
# The largest body any endpoint takes is POST /start's {"device": "<name of 200 characters>"}.
MAX_BODY_BYTES = 4096


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "menny" / "clips"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    device: int | str | None = None
    data_dir: Path | None = None  # None: default_data_dir()
    token: str | None = None
    max_clip_s: float = 1800.0
    max_clips: int = 100
    max_storage_mb: float = 1024.0
    # The page (Streamlit's default port); a browser on any other origin gets no access.
    allowed_origins: tuple[str, ...] = ("http://localhost:8501", "http://127.0.0.1:8501")


class InsecureConfig(ValueError):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_security(config: ServerConfig) -> None:
    """Refuses a configuration that would let other machines, or other web sites, hear the room."""
    if "*" in config.allowed_origins:
        raise InsecureConfig("--allow-origin '*' would let any web site use the microphone")
    if config.token is not None and len(config.token) < MIN_TOKEN_LENGTH:
        raise InsecureConfig(
            f"the token must have at least {MIN_TOKEN_LENGTH} characters; make one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )
    if not is_loopback(config.host) and config.token is None:
        raise InsecureConfig(
            f"--host {config.host} lets other machines reach the microphone: set a token "
            "(MENNY_TOKEN=... or --token ...), or listen on 127.0.0.1"
        )


# --- response and request models --------------------------------------------------------

DeviceChoice = Annotated[StrictInt, Field(ge=0)] | Annotated[StrictStr, Field(min_length=1, max_length=200)]


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: DeviceChoice | None = Field(
        None,
        description="Input device index, or its name or a part of it (any case); "
        "default: the server's --device, else the system's default input.",
        examples=["pulse"],
    )


class Started(BaseModel):
    clip_id: str
    device: str
    sample_rate: int = Field(description="Rate of the clip (always 16000).")
    capture_rate: int = Field(description="Rate PortAudio delivers; converted if not 16000.")
    max_clip_s: float


class Saved(BaseModel):
    id: str
    duration_s: float
    peak_dbfs: float
    size_bytes: int
    overflows: int = Field(description="Input blocks PortAudio reported lost.")
    limit_reached: bool = Field(description="Capture ended at the maximum clip length.")
    device: str
    error: str | None = Field(description="A write failure during the recording, if any.")
    url: str


class Status(BaseModel):
    recording: bool
    clip_id: str | None
    elapsed_s: float
    level_dbfs: float = Field(description="RMS of the last 100 ms; -100 when idle or silent.")
    device: str | None
    clip_count: int
    overflows: int
    limit_reached: bool
    max_clip_s: float
    error: str | None = Field(description="Why recording is impossible now, or a write failure.")


class ClipItem(BaseModel):
    id: str
    created: dt.datetime
    duration_s: float
    size_bytes: int
    url: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorMessage(BaseModel):
    detail: str


class ValidationProblem(BaseModel):
    detail: str | list[dict[str, Any]]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorMessage, "description": description}


WAV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}}},
        "description": "16 kHz mono 16-bit PCM WAV",
    }
}
UNAVAILABLE = _error("No input device, or PortAudio missing; the detail says how to fix it.")


def _clip_url(clip_id: str) -> str:
    return f"/wav/{clip_id}"


def _clip(info: ClipInfo) -> ClipItem:
    return ClipItem(
        id=info.id, created=info.created, duration_s=info.duration_s,
        size_bytes=info.size_bytes, url=_clip_url(info.id),
    )


def _saved(take: FinishedTake) -> Saved:
    return Saved(
        id=take.clip.id, duration_s=take.clip.duration_s, peak_dbfs=take.peak_dbfs,
        size_bytes=take.clip.size_bytes, overflows=take.overflows,
        limit_reached=take.limit_reached, device=take.device, error=take.error,
        url=_clip_url(take.clip.id),
    )


def _wav_file(info: ClipInfo) -> StreamingResponse:
    # Opened here, not by the response later: a clip deleted meanwhile stays readable to the end.
    try:
        f = open(info.path, "rb")  # noqa: SIM115 - closed by the generator below
    except FileNotFoundError:
        raise HTTPException(404, f"Clip {info.id} was just deleted.") from None
    size = os.fstat(f.fileno()).st_size

    def chunks() -> Iterator[bytes]:
        with f:
            while chunk := f.read(1 << 16):
                yield chunk

    headers = {
        "Content-Length": str(size),
        "Content-Disposition": f'inline; filename="{info.id}.wav"',
        "X-Clip-Id": info.id,
    }
    return StreamingResponse(chunks(), media_type="audio/wav", headers=headers)


# --- dependencies -----------------------------------------------------------------------


def get_recorder(request: Request) -> Recorder:
    return request.app.state.recorder


def get_store(request: Request) -> ClipStore:
    return request.app.state.recorder.store


RecorderDep = Annotated[Recorder, Depends(get_recorder)]
StoreDep = Annotated[ClipStore, Depends(get_store)]
ClipId = Annotated[str, PathParam(pattern=CLIP_ID_PATTERN, examples=["20250102-130405-123456"])]

# --- endpoints --------------------------------------------------------------------------

public = APIRouter()
router = APIRouter(
    responses={
        401: _error("Missing or wrong token (only when a token is set)."),
        413: _error(f"The body is larger than {MAX_BODY_BYTES} bytes."),
    }
)


@public.get("/health")
def health() -> Health:
    """Liveness: answers whether or not a microphone is available."""
    return Health()


@public.get("/docs", response_class=HTMLResponse, include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(docs_html(request.app.openapi()))


@router.post(
    "/start",
    responses={
        400: _error("The body is not JSON."),
        409: _error("Already recording."),
        422: {"model": ValidationProblem, "description": "No such input device."},
        503: UNAVAILABLE,
    },
)
def start(recorder: RecorderDep, body: StartRequest | None = None) -> Started:
    """Starts recording a new clip from the microphone."""
    try:
        started = recorder.start(body.device if body else None)
    except AlreadyRecording:
        raise HTTPException(409, "Already recording: POST /stop first.") from None
    except DeviceNotFound as exc:
        raise HTTPException(422, str(exc)) from None
    except AudioUnavailable as exc:
        raise HTTPException(503, str(exc)) from None
    return Started(
        clip_id=started.clip_id, device=started.device.name, sample_rate=SAMPLE_RATE,
        capture_rate=started.capture_rate, max_clip_s=recorder.max_clip_s,
    )


@router.post("/stop", responses={409: _error("Not recording.")})
def stop(recorder: RecorderDep) -> Saved:
    """Stops recording and saves the clip."""
    try:
        return _saved(recorder.stop())
    except NotRecording:
        raise HTTPException(409, "Not recording: POST /start first.") from None


@router.get("/status")
def status(recorder: RecorderDep) -> Status:
    """Whether it is recording, for how long, how loud, and from which device."""
    now = recorder.status()
    return Status(
        recording=now.recording, clip_id=now.clip_id, elapsed_s=now.elapsed_s,
        level_dbfs=now.level_dbfs, device=now.device, clip_count=len(recorder.store.list()),
        overflows=now.overflows, limit_reached=now.limit_reached,
        max_clip_s=recorder.max_clip_s, error=now.error,
    )


@router.get("/devices", responses={503: UNAVAILABLE})
def devices(recorder: RecorderDep) -> list[InputDevice]:
    """The input devices PortAudio sees (re-scanned when not recording)."""
    try:
        found = recorder.devices()
    except AudioUnavailable as exc:
        raise HTTPException(503, str(exc)) from None
    return found


@router.get(
    "/wav", response_class=Response, responses={**WAV_RESPONSE, 404: _error("No clip yet.")}
)
def latest_wav(
    recorder: RecorderDep,
    partial: bool = False,
    start_frame: Annotated[int, Query(ge=0, le=2**40)] = 0,
) -> Response:
    """The latest finished clip; with partial=true while recording, the audio so far (from
    sample `start_frame` on, so that a follower fetches only what is new)."""
    if partial and (so_far := recorder.partial_wav(start_frame)) is not None:
        clip_id, wav = so_far
        return Response(wav, media_type="audio/wav", headers={"X-Clip-Id": clip_id})
    latest = recorder.store.latest()
    if latest is None:
        raise HTTPException(404, "No clip yet: POST /start, then POST /stop.")
    return _wav_file(latest)


@router.get(
    "/wav/{clip_id}",
    response_class=Response,
    responses={
        **WAV_RESPONSE,
        404: _error("No such clip."),
        409: _error("Still being recorded."),
    },
)
def clip_wav(clip_id: ClipId, store: StoreDep) -> Response:
    """One clip by id."""
    try:
        return _wav_file(store.get(clip_id))
    except ClipNotFound:
        raise HTTPException(404, f"No clip {clip_id}; GET /clips lists them.") from None
    except ClipBusy:
        raise HTTPException(
            409, f"Clip {clip_id} is still being recorded: GET /wav?partial=true for the audio so far."
        ) from None


@router.get("/clips")
def clips(store: StoreDep) -> list[ClipItem]:
    """The kept clips, newest first."""
    return [_clip(info) for info in reversed(store.list())]


@router.delete(
    "/clips/{clip_id}",
    status_code=204,
    response_class=Response,
    responses={404: _error("No such clip."), 409: _error("Still being recorded.")},
)
def delete_clip(clip_id: ClipId, store: StoreDep) -> Response:
    """Deletes a clip."""
    try:
        store.delete(clip_id)
    except ClipNotFound:
        raise HTTPException(404, f"No clip {clip_id}; GET /clips lists them.") from None
    except ClipBusy:
        raise HTTPException(409, f"Clip {clip_id} is still being recorded: POST /stop first.") from None
    return Response(status_code=204)


# --- the app ----------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # Ctrl-C or SIGTERM: uvicorn stops serving, then this closes the stream and the WAV.
    finished = await run_in_threadpool(app.state.recorder.close)
    if finished is not None:
        log.info("shutdown: saved the running recording as %s", finished.clip.id)


def create_app(config: ServerConfig) -> FastAPI:
    """The server as an ASGI app (tests run it in-process); raises InsecureConfig."""
    check_security(config)
    store = ClipStore(
        config.data_dir or default_data_dir(),
        max_clips=config.max_clips,
        max_bytes=max(1, round(config.max_storage_mb * 1024 * 1024)),
    )
    recorder = Recorder(store, device=config.device, max_clip_s=config.max_clip_s)

    app = FastAPI(
        title="Menny microphone server",
        summary="Records this machine's microphone as 16 kHz mono clips for transcription.",
        version="1.0",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own docs load from a CDN; /docs is ours, made without network
        redoc_url=None,
    )
    app.state.config = config
    app.state.recorder = recorder
    app.include_router(public)
    app.include_router(router)
    # Before the body is read: FastAPI reads it before any dependency could check the token.
    app.add_middleware(RequestGuard, token=config.token, public_paths=PUBLIC_PATHS, max_body_bytes=MAX_BODY_BYTES)

    origins = {*config.allowed_origins}
    if is_loopback(config.host):
        # Other web sites can reach 127.0.0.1 through DNS rebinding; the Host header exposes it.
        own = f"[{config.host}]" if ":" in config.host else config.host
        hosts = sorted({*LOOPBACK_HOSTS, own})
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
        origins |= {f"http://{host}:{config.port}" for host in hosts}  # the page at /docs

    @app.middleware("http")
    async def refuse_foreign_origins(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # CORS only hides responses from other sites; a "simple" POST /start would still run.
        origin = request.headers.get("origin")
        if origin is not None and origin not in origins:
            return JSONResponse({"detail": f"Origin {origin} is not allowed."}, status_code=403)
        return await call_next(request)

    app.add_middleware(
        CORSMiddleware,
        allow_origins=sorted(origins),
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["X-Clip-Id"],
    )
    return app


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(
        description="Menny's microphone server (API docs at /docs once running)."
    )
    parser.add_argument(
        "--host", default=os.environ.get("MENNY_SERVER_HOST", "127.0.0.1"),
        help="address to listen on (default 127.0.0.1; any other needs a token)",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("MENNY_SERVER_PORT", DEFAULT_PORT)),
        help=f"port (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--device", help="input device index or name (default: the system's default input)"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=default_data_dir(),
        help="folder of the clips (default %(default)s)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("MENNY_TOKEN"),
        help="bearer token required by every endpoint but /health (default: $MENNY_TOKEN)",
    )
    parser.add_argument("--max-clip-seconds", type=float, default=1800.0,
                        help="longest clip; the microphone closes there (default 1800)")
    parser.add_argument("--max-clips", type=int, default=100,
                        help="clips kept; the oldest go first (default 100)")
    parser.add_argument("--max-storage-mb", type=float, default=1024.0,
                        help="total size of the kept clips (default 1024)")
    parser.add_argument("--allow-origin", action="append", metavar="URL",
                        help="a web page origin allowed to call the server (repeatable; "
                        "default: the page at http://localhost:8501 and http://127.0.0.1:8501)")
    args = parser.parse_args(argv)
    if args.max_clip_seconds <= 0 or args.max_clip_seconds > 24 * 3600:
        parser.error("--max-clip-seconds must be more than 0 and at most 86400")
    if args.max_clips < 1 or args.max_storage_mb <= 0:
        parser.error("--max-clips and --max-storage-mb must be positive")
    device = int(args.device) if args.device and args.device.isdigit() else args.device
    return ServerConfig(
        host=args.host, port=args.port, device=device, data_dir=args.data_dir,
        token=args.token or None, max_clip_s=args.max_clip_seconds, max_clips=args.max_clips,
        max_storage_mb=args.max_storage_mb,
        allowed_origins=tuple(args.allow_origin or ServerConfig.allowed_origins),
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(config)
    except InsecureConfig as exc:
        print(f"audio_server.py: refusing to start: {exc}", file=sys.stderr)
        return 2
    state = app.state.recorder.status()
    if state.error:
        log.warning("recording is not possible yet: %s", state.error)
    else:
        log.info("microphone: %s", state.device)
    log.info("clips in %s", app.state.recorder.store.root)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
