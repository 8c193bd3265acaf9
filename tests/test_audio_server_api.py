"""The microphone server's HTTP API in-process (TestClient), recording from the virtual
microphone: status codes and messages, parameters, limits, tokens, origins, and fuzzing of the
OpenAPI schema."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from speech import clip
from virtual_mic import VirtualMic, locate, read_wav, wait_for

from audio_server import ServerConfig, create_app

BASE_URL = "http://127.0.0.1"  # the Host header a loopback server accepts
TOKEN = "a-token-of-twenty-characters"
SPEECH = clip("ps_cards_005.wav")


def make_client(data_dir: Path, **overrides) -> TestClient:
    return TestClient(create_app(ServerConfig(data_dir=data_dir, **overrides)), base_url=BASE_URL)


@pytest.fixture
def client(mic_env: VirtualMic, tmp_path: Path) -> Iterator[TestClient]:
    with make_client(tmp_path / "clips") as c:
        yield c


def test_recording_lifecycle_and_its_errors(client: TestClient, mic_env: VirtualMic) -> None:
    assert client.get("/wav").status_code == 404
    assert client.post("/stop").status_code == 409
    assert client.post("/stop").json()["detail"] == "Not recording: POST /start first."

    started = client.post("/start")
    assert started.status_code == 200, started.text
    clip_id = started.json()["clip_id"]
    assert started.json()["sample_rate"] == 16000
    again = client.post("/start")
    assert again.status_code == 409 and "POST /stop" in again.json()["detail"]
    assert client.get(f"/wav/{clip_id}").status_code == 409
    assert client.delete(f"/clips/{clip_id}").status_code == 409
    assert client.get("/wav").status_code == 404  # nothing finished yet
    assert client.get("/clips").json() == []

    speaking = threading.Thread(target=mic_env.play, args=(SPEECH.path,))
    speaking.start()
    # The meter shows speech while it plays (silence reads -100 dBFS).
    wait_for(lambda: client.get("/status").json()["level_dbfs"] > -40, "speech on the level meter")
    speaking.join()
    status = wait_for(
        lambda: (s := client.get("/status").json())["elapsed_s"] > SPEECH.duration + 0.5 and s,
        "the played clip to be recorded",
    )
    assert status["recording"] and status["clip_id"] == clip_id and status["overflows"] == 0
    partial = client.get("/wav", params={"partial": True})
    assert partial.status_code == 200 and partial.headers["x-clip-id"] == clip_id
    played, _ = read_wav(SPEECH.path)
    assert locate(read_wav(partial.content)[0], played)[1] >= 0.99
    # A follower asks only for what it has not seen: the rest of the same recording.
    so_far = read_wav(partial.content)[0]
    half = so_far.size // 2
    rest = client.get("/wav", params={"partial": True, "start_frame": half})
    assert rest.status_code == 200 and rest.headers["x-clip-id"] == clip_id
    assert (read_wav(rest.content)[0][: so_far.size - half] == so_far[half:]).all()

    saved = client.post("/stop").json()
    assert saved["id"] == clip_id and saved["url"] == f"/wav/{clip_id}"
    assert saved["duration_s"] >= status["elapsed_s"]
    assert -20 < saved["peak_dbfs"] <= 0  # speech, not silence and not clipping
    assert client.get("/status").json()["recording"] is False

    by_id = client.get(f"/wav/{clip_id}")
    assert by_id.headers["content-type"] == "audio/wav"
    assert by_id.content == client.get("/wav").content
    assert len(by_id.content) == saved["size_bytes"]
    # Partial outside a recording is the latest clip.
    assert client.get("/wav", params={"partial": True}).content == by_id.content
    assert [c["id"] for c in client.get("/clips").json()] == [clip_id]

    assert client.delete(f"/clips/{clip_id}").status_code == 204
    assert client.delete(f"/clips/{clip_id}").status_code == 404
    missing = client.get(f"/wav/{clip_id}")
    assert missing.status_code == 404 and "GET /clips" in missing.json()["detail"]


@pytest.mark.parametrize(
    ("request_args", "detail"),
    [
        ({"json": {"device": -1}}, None),
        ({"json": {"device": ""}}, None),
        ({"json": {"device": True}}, None),
        ({"json": {"device": 1.5}}, None),
        ({"json": {"microphone": "pulse"}}, None),
        ({"content": b"not json", "headers": {"content-type": "application/json"}}, None),
        ({"json": {"device": "no such microphone"}}, "is not an input device; the inputs are"),
        ({"json": {"device": 999}}, "is not an input device"),
    ],
)
def test_bad_start_parameters_get_422(client: TestClient, request_args: dict, detail: str | None) -> None:
    response = client.post("/start", **request_args)
    assert response.status_code == 422, response.text
    if detail:
        assert detail in response.json()["detail"]
    assert client.get("/status").json()["recording"] is False


@pytest.mark.parametrize(
    "path",
    ["/wav/not-a-clip", "/wav/20250101-000000", "/clips/20250101-000000-0000000",
     "/wav?partial=maybe", "/wav?partial=true&start_frame=-1", "/wav?partial=true&start_frame=x"],
)
def test_bad_clip_ids_and_flags_get_422(client: TestClient, path: str) -> None:
    method = client.delete if path.startswith("/clips") else client.get
    assert method(path).status_code == 422


@pytest.mark.parametrize("path", ["/wav/..%2F..%2Fetc%2Fpasswd", "/wav/../../etc/passwd", "/clips/%2E%2E"])
def test_paths_cannot_escape_the_data_dir(client: TestClient, path: str) -> None:
    assert client.get(path).status_code in (404, 405, 422)
    assert client.delete(path).status_code in (404, 405, 422)


def test_device_chosen_by_name(client: TestClient) -> None:
    devices = client.get("/devices").json()
    assert {d["name"] for d in devices} >= {"pulse", "default"}
    assert sum(d["is_default"] for d in devices) == 1
    started = client.post("/start", json={"device": "PULSE"})
    assert started.json()["device"] == "pulse"
    assert client.get("/status").json()["device"] == "pulse"
    assert client.post("/stop").json()["device"] == "pulse"


def test_clip_length_limit_closes_the_microphone(mic_env: VirtualMic, tmp_path: Path) -> None:
    with make_client(tmp_path, max_clip_s=0.25) as client:
        client.post("/start")
        wait_for(lambda: client.get("/status").json()["limit_reached"], "the length limit")
        assert client.post("/start").status_code == 409  # the take stays open until /stop
        saved = client.post("/stop").json()
    assert saved["limit_reached"] is True
    assert saved["duration_s"] == 0.25


def test_retention_keeps_the_newest_clips(mic_env: VirtualMic, tmp_path: Path) -> None:
    with make_client(tmp_path, max_clips=3) as client:
        ids = []
        for _ in range(5):
            client.post("/start")
            ids.append(client.post("/stop").json()["id"])
        assert [c["id"] for c in client.get("/clips").json()] == ids[:1:-1]
        assert client.get("/status").json()["clip_count"] == 3
    assert sorted(p.stem for p in tmp_path.glob("*.wav")) == ids[2:]


def test_shutdown_saves_the_running_recording(mic_env: VirtualMic, tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        clip_id = client.post("/start").json()["clip_id"]
        wait_for(lambda: client.get("/status").json()["elapsed_s"] > 0.2, "some audio")
    with make_client(tmp_path) as client:
        clips = client.get("/clips").json()
        assert [c["id"] for c in clips] == [clip_id] and clips[0]["duration_s"] > 0.2


def _requests_for_every_endpoint(app: FastAPI) -> list[tuple[str, str]]:
    return [
        (method.upper(), path.replace("{clip_id}", "20250101-000000-000000"))
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    ]


def test_token_is_required_everywhere_but_health(mic_env: VirtualMic, tmp_path: Path) -> None:
    with make_client(tmp_path, token=TOKEN) as client:
        calls = _requests_for_every_endpoint(client.app)
        assert len(calls) == 9
        for method, path in calls:
            for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"},
                            {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
                response = client.request(method, path, headers=headers)
                if path == "/health":
                    assert response.status_code == 200
                else:
                    assert response.status_code == 401, (method, path, headers)
                    assert response.headers["www-authenticate"] == "Bearer"
                    assert "Authorization: Bearer" in response.json()["detail"]
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        assert client.get("/status").status_code == 200
        assert client.post("/start").status_code == 200
        assert client.post("/stop").status_code == 200


def test_token_and_size_are_checked_before_the_body(mic_env: VirtualMic, tmp_path: Path) -> None:
    with make_client(tmp_path, token=TOKEN) as client:
        # Malformed JSON from a stranger: refused for the token, not parsed.
        response = client.post("/start", content=b"{not json", headers={"Content-Type": "application/json"})
        assert response.status_code == 401
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        big = b'{"device": "' + b"x" * 5000 + b'"}'
        response = client.post("/start", content=big, headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "4096 bytes" in response.json()["detail"]
        # Without a length (chunked), counted as it arrives.
        response = client.post("/start", content=iter([big[:3000], big[3000:]]),
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert client.get("/status").json()["recording"] is False


def test_docs_need_no_network(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "/start" in response.text and "InputDevice" in response.text
    assert "<script" not in response.text and "https://" not in response.text and "cdn" not in response.text.lower()
    assert client.get("/redoc").status_code == 404


def test_other_web_sites_are_refused(client: TestClient) -> None:
    page = "http://localhost:8501"
    allowed = client.get("/status", headers={"Origin": page})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == page
    for origin in ("http://evil.example", "null", "http://localhost:8502"):
        refused = client.post("/start", headers={"Origin": origin})
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
        preflight = client.options("/start", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers
    assert client.get("/status").json()["recording"] is False
    # DNS rebinding: a foreign name that resolves to 127.0.0.1.
    assert client.get("/status", headers={"Host": "evil.example"}).status_code == 400


# --- fuzzing ------------------------------------------------------------------------------

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.mark.parametrize("mode", list(GenerationMode))
def test_fuzzing_the_schema_finds_no_server_errors(
    mic_env: VirtualMic, tmp_path: Path, mode: GenerationMode
) -> None:
    """Schemathesis generates requests from the OpenAPI schema, valid ones (positive) or invalid
    ones (negative); Hypothesis strings them into random sequences of calls to one app that
    keeps its state (recording or not, clips) throughout. No response may be a 5xx or disagree
    with the schema."""
    app = create_app(ServerConfig(data_dir=tmp_path, max_clips=3, max_clip_s=2.0))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Host": "127.0.0.1"})
    operations = [result.ok() for result in schema.get_all_operations()]
    if mode is GenerationMode.NEGATIVE:  # those without parameters have no invalid requests
        operations = [op for op in operations if len(op.path_parameters) + len(op.query) + len(op.body)]
    calls: list[tuple[str, int]] = []

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of([op.as_strategy(generation_mode=mode) for op in operations]), min_size=1, max_size=10))
    def run_sequence(cases: list[schemathesis.Case]) -> None:
        for case in cases:
            response = case.call(base_url=BASE_URL)
            calls.append((case.operation.label, response.status_code))
            case.validate_response(response, checks=CHECKS)

    try:
        run_sequence()
    finally:
        app.state.recorder.close()
    codes = Counter(code for _, code in calls)
    print(f"\nfuzzing ({mode.value}): {len(calls)} requests, status codes {sorted(codes.items())}")
    assert {label for label, _ in calls} == {op.label for op in operations}
    assert not [code for code in codes if code >= 500]
