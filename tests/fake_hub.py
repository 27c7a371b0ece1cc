"""A local HTTP server that stands in for the Hugging Face hub (HF_ENDPOINT=http://127.0.0.1:PORT).

It serves the two things huggingface_hub asks for: a repo's metadata (`/api/models/...`) and files
(`/{repo}/resolve/{revision}/{file}`, with HTTP ranges), and can misbehave on request: cut a file off
mid-transfer, answer 401 or 404.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: set[str] = set()
        self.cut_after: dict[str, int] = {}  # file name → bytes to send before dropping the connection
        self.cuts_left = 0
        self.stall_after: dict[str, int] = {}  # file name → bytes to send, then wait for `release`
        self.release = threading.Event()
        self.bytes_served: dict[str, int] = {}
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add_repo(self, repo_id: str, folder: Path | None = None, files: dict[str, bytes] | None = None):
        content = dict(files or {})
        if folder is not None:
            content.update({p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()})
        self.repos[repo_id] = content

    def sha(self, repo_id: str) -> str:
        digest = hashlib.sha1(repo_id.encode())
        for name, data in sorted(self.repos[repo_id].items()):
            digest.update(name.encode() + hashlib.sha1(data).digest())
        return digest.hexdigest()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(hub):  # noqa: N805 - the handler class closes over the hub
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _route(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path} {self.headers.get('Range', '')}".strip())
                if path.startswith("/api/models/"):
                    rest = path[len("/api/models/"):]
                    repo_id = "/".join(rest.split("/")[:2])
                    return "info", repo_id, None
                parts = path.lstrip("/").split("/")
                if len(parts) >= 5 and parts[2] == "resolve":
                    return "file", f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                return "unknown", None, None

            def _refuse(self, repo_id: str) -> bool:
                if repo_id in hub.private:
                    self._json(401, {"error": "Invalid credentials"})
                    return True
                if repo_id not in hub.repos:
                    self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    return True
                return False

            def do_GET(self):
                kind, repo_id, name = self._route()
                if kind == "unknown" or self._refuse(repo_id):
                    if kind == "unknown":
                        self._json(404, {"error": "not found"})
                    return
                files = hub.repos[repo_id]
                sha = hub.sha(repo_id)
                if kind == "info":
                    siblings = [{"rfilename": n, "size": len(d), "blobId": hashlib.sha1(d).hexdigest()}
                                for n, d in sorted(files.items())]
                    self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                                     "siblings": siblings})
                    return
                self._send_file(files, name, sha, body=self.command == "GET")

            def do_HEAD(self):
                self.do_GET()

            def _send_file(self, files, name, sha, body: bool):
                if name not in files:
                    self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                    return
                data = files[name]
                etag = hashlib.sha1(data).hexdigest()
                start = 0
                range_header = self.headers.get("Range")
                if range_header and range_header.startswith("bytes="):
                    start = int(range_header[len("bytes="):].split("-")[0] or 0)
                chunk = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(chunk)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", sha)
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return
                stall = hub.stall_after.get(name)
                if stall is not None and stall > start:
                    self.wfile.write(chunk[: stall - start])
                    self.wfile.flush()
                    hub.bytes_served[name] = hub.bytes_served.get(name, 0) + stall - start
                    hub.release.wait(60)  # the client is interrupted meanwhile
                    self.close_connection = True
                    return
                limit = hub.cut_after.get(name)
                if limit is not None and hub.cuts_left > 0:
                    hub.cuts_left -= 1
                    sent = chunk[: max(0, limit - start)]
                    self.wfile.write(sent)
                    hub.bytes_served[name] = hub.bytes_served.get(name, 0) + len(sent)
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # drop the connection mid-file
                    return
                self.wfile.write(chunk)
                hub.bytes_served[name] = hub.bytes_served.get(name, 0) + len(chunk)

        return Handler
