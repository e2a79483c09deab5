"""A stand-in for the Hugging Face hub, on 127.0.0.1 only, for tests (point HF_ENDPOINT at `.url`).

It answers the three requests qcpu's hub code makes through huggingface_hub:

    GET  /api/models/{repo}/tree/{revision}?recursive=..   file listing (JSON)
    HEAD /{repo}/resolve/{revision}/{path}                  metadata: X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{revision}/{path}                  the bytes

Unknown repos and files get the hub's 404s (X-Error-Code: RepoNotFound / EntryNotFound), so
huggingface_hub raises its usual errors. Every request is logged in `.requests`.

    with StandInHub({"acme/Tiny-GGUF": {"tiny-Q8_0.gguf": b"..."}}) as hub:
        env = {"HF_ENDPOINT": hub.url}
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], commit: str = COMMIT):
        self.repos = repos
        self.commit = commit
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _not_found(self, code: str, head: bool):
                self._send(404, json.dumps({"error": code}).encode(),
                           {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json",
                            "X-Repo-Commit": hub.commit}, head)

            def _route(self, head: bool):
                hub.requests.append((self.command, self.path))
                path = unquote(urlsplit(self.path).path)
                parts = path.strip("/").split("/")
                # /api/models/{owner}/{name}/tree/{revision}[/{sub}]
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    repo = "/".join(parts[2:4])
                    files = hub.repos.get(repo)
                    if files is None:
                        return self._not_found("RepoNotFound", head)
                    listing = [{"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data),
                                "path": name} for name, data in sorted(files.items())]
                    return self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, head)
                # /{owner}/{name}/resolve/{revision}/{path...}
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                    files = hub.repos.get(repo)
                    if files is None:
                        return self._not_found("RepoNotFound", head)
                    if name not in files:
                        return self._not_found("EntryNotFound", head)
                    data = files[name]
                    etag = f'"{hashlib.sha256(data).hexdigest()}"'
                    headers = {"X-Repo-Commit": hub.commit, "ETag": etag, "X-Linked-Etag": etag,
                               "X-Linked-Size": str(len(data)), "Content-Type": "application/octet-stream"}
                    if head:
                        self.send_response(200)
                        for k, v in headers.items():
                            self.send_header(k, v)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        return None
                    return self._send(200, data, headers)
                return self._not_found("RepoNotFound", head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "StandInHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "StandInHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
