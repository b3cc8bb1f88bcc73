"""A tiny stand-in for the Hugging Face Hub HTTP API, enough for create_repo + upload_folder + download.

Routes (as huggingface_hub's `hf_api.py`, `_commit_api.py`, `_upload_pipeline.py` and
`file_download.py` call them; model repos only):

    POST /api/repos/create                        {"name", "organization"} -> {"url"}; 409 if it exists
    POST /api/validate-yaml                       README metadata check -> no errors
    POST /api/models/{repo}/preupload/{rev}       -> every file "regular", so no LFS/Xet transfer: the
                                                     bytes travel base64-encoded in the commit body
    POST /api/models/{repo}/commit/{rev}          NDJSON: header line, then "file" / "deletedFile" lines
    GET  /api/models/{repo}[/revision/{rev}]      repo info: sha, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]   file listing (one page)
    HEAD/GET /{repo}/resolve/{rev}/{path}         file bytes, with X-Repo-Commit and ETag headers

Files land in `root/{repo_id}/{path}`. `requests` records every (method, path) and `unknown` the
ones no route matched, so a test can check that nothing else was needed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_oid(content: bytes) -> str:
    """The git object id the Hub reports for a regular file (sha1 of "blob {size}\\0" + content)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class LocalHub:
    """Run with `with LocalHub(tmp_path) as hub:`; `hub.endpoint` is its base URL."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "sha": str, "commits": [...]}
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.authorizations: list[str | None] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """Path in repo -> content, as stored by the commits so far."""
        base = self.root / repo_id
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}

    # ------------------------------------------------------------------ request handling

    def _routes(self):
        return [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda h, m: h.reply(200, {"errors": [], "warnings": []})),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
            ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._tree),
            ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
            ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
        ]

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every reply sets Content-Length

            def log_message(self, *args):  # keep pytest output clean
                pass

            def body(self) -> bytes:
                # Read once per request, always: unread bytes would corrupt the next keep-alive request.
                if not hasattr(self, "_body"):
                    self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                return self._body

            def reply(self, status: int, payload=None, headers=None, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def dispatch(self):
                path = unquote(urlsplit(self.path).path)
                if hasattr(self, "_body"):
                    del self._body  # the handler object serves every request of the connection
                self.body()
                with hub._lock:
                    hub.requests.append((self.command, path))
                    hub.authorizations.append(self.headers.get("Authorization"))
                for method, pattern, route in hub._routes():
                    match = re.fullmatch(pattern, path)
                    if method == self.command and match:
                        with hub._lock:
                            return route(self, match)
                hub.unknown.append((self.command, path))
                self.reply(404, {"error": f"no route for {self.command} {path}"})

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = dispatch

        return Handler

    def _repo_or_404(self, handler, repo_id: str) -> dict | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            handler.reply(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
        return repo

    def _create_repo(self, handler, match):
        payload = json.loads(handler.body())
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return handler.reply(409, {"error": "You already created this model repo", "url": url})
        self.repos[repo_id] = {"private": payload.get("visibility") == "private", "sha": "0" * 40, "commits": []}
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        handler.reply(200, {"url": url, "name": repo_id})

    def _preupload(self, handler, match):
        if (repo := self._repo_or_404(handler, match["repo"])) is None:
            return
        stored = self.files(match["repo"])
        files = json.loads(handler.body())["files"]
        handler.reply(
            200,
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_oid(stored[f["path"]]) if f["path"] in stored else None,
                    }
                    for f in files
                ],
                "commitOid": repo["sha"],
            },
        )

    def _commit(self, handler, match):
        if (repo := self._repo_or_404(handler, match["repo"])) is None:
            return
        lines = [json.loads(line) for line in handler.body().splitlines() if line.strip()]
        header, operations = lines[0], lines[1:]
        base = self.root / match["repo"]
        for op in operations:
            if op["key"] == "file":
                target = base / op["value"]["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(op["value"]["content"]))
            elif op["key"] == "deletedFile":
                (base / op["value"]["path"]).unlink(missing_ok=True)
            else:  # lfsFile etc.: never announced by preupload, so a client sending one is a bug
                return handler.reply(400, {"error": f"unsupported commit operation {op['key']}"})
        repo["sha"] = hashlib.sha1(f"{repo['sha']}{header}{len(repo['commits'])}".encode()).hexdigest()
        repo["commits"].append({"sha": repo["sha"], "summary": header["value"]["summary"]})
        url = f"{self.endpoint}/{match['repo']}/commit/{repo['sha']}"
        handler.reply(200, {"commitUrl": url, "commitOid": repo["sha"], "pullRequestUrl": None})

    def _repo_info(self, handler, match):
        if (repo := self._repo_or_404(handler, match["repo"])) is None:
            return
        siblings = [{"rfilename": path} for path in self.files(match["repo"])]
        payload = {"id": match["repo"], "sha": repo["sha"], "private": repo["private"], "siblings": siblings}
        handler.reply(200, payload)

    def _tree(self, handler, match):
        if self._repo_or_404(handler, match["repo"]) is None:
            return
        prefix = (match["path"] or "").strip("/")
        entries = [
            {"type": "file", "path": path, "size": len(content), "oid": git_blob_oid(content)}
            for path, content in self.files(match["repo"]).items()
            if not prefix or path.startswith(prefix + "/")
        ]
        handler.reply(200, entries)

    def _resolve(self, handler, match):
        if (repo := self._repo_or_404(handler, match["repo"])) is None:
            return
        content = self.files(match["repo"]).get(match["path"])
        if content is None:
            return handler.reply(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{git_blob_oid(content)}"'}
        handler.reply(200, headers=headers, raw=content)
