"""The Hugging Face Hub's few endpoints that `snapshot_download` calls, served on 127.0.0.1 from
real model files: a repo's revision (its commit and files), its file tree, and each file's
HEAD and GET (ranges too). The network is the one thing these tests fake; the hub client is
huggingface_hub's own. Files are sent in small chunks with short pauses, so that a download
lasts long enough (about a second) for its progress to be watched.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

CHUNK_BYTES = 1 << 18


@dataclass(frozen=True)
class HubFile:
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    def tree_entry(self, path: str) -> dict:
        lfs = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return {"type": "file", "path": path, "size": len(self.data), "oid": self.git_sha1, "lfs": lfs}


class FakeHub:
    """Serves `repos` (repo id -> {file name: path}) on a free port until the `with` block that
    holds it ends; `pause_s` between chunks paces the downloads."""

    def __init__(self, repos: dict[str, dict[str, Path]], pause_s: float = 0.02) -> None:
        self.repos = {
            repo: {name: HubFile(path.read_bytes()) for name, path in files.items()} for repo, files in repos.items()
        }
        self.pause_s = pause_s
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def commit(self, repo: str) -> str:
        """The repo's one commit: 40 hex digits of its id."""
        return hashlib.sha1(repo.encode()).hexdigest()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


_REVISION = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<revision>[^/]+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/]+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _answer(self, send_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            for pattern, answer in ((_REVISION, self._revision), (_TREE, self._tree), (_RESOLVE, self._file)):
                if (match := pattern.match(path)) and match["repo"] in hub.repos:
                    return answer(match, send_body)
            self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})

        def _revision(self, match: re.Match, send_body: bool) -> None:
            repo = match["repo"]
            siblings = [{"rfilename": name} for name in hub.repos[repo]]
            self._json({"id": repo, "modelId": repo, "sha": hub.commit(repo), "private": False, "siblings": siblings})

        def _tree(self, match: re.Match, send_body: bool) -> None:
            self._json([file.tree_entry(name) for name, file in hub.repos[match["repo"]].items()])

        def _file(self, match: re.Match, send_body: bool) -> None:
            file = hub.repos[match["repo"]].get(match["file"])
            if file is None:
                return self._json({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
            start = int(ranged[1]) if (ranged := _RANGE.match(self.headers.get("Range", ""))) else 0
            self.send_response(206 if start else 200)
            headers = {
                "Content-Length": str(len(file.data) - start),
                "ETag": f'"{file.sha256}"',
                "X-Linked-Etag": f'"{file.sha256}"',
                "X-Linked-Size": str(len(file.data)),
                "X-Repo-Commit": hub.commit(match["repo"]),
                "Accept-Ranges": "bytes",
            }
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(file.data) - 1}/{len(file.data)}"
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                for offset in range(start, len(file.data), CHUNK_BYTES):
                    self.wfile.write(file.data[offset : offset + CHUNK_BYTES])
                    self.wfile.flush()
                    time.sleep(hub.pause_s)

        def _json(self, body: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@contextmanager
def hub_at(url: str, hub_cache: Path) -> Iterator[None]:
    """huggingface_hub in this process talks to `url`, online, keeping what it downloads in
    `hub_cache` (it reads these settings from the environment once, on import), and counts a
    download's bytes every chunk: it does every 10 MB, more than a small test model holds."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", url)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
        patch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK_BYTES)
        yield
