"""A small Hugging Face Hub for tests: serves model folders in the Hub's URL layout, as huggingface_hub requests it.

GET /api/models/{repo}[/revision/{rev}] (model info, `?blobs=True` adds sizes), /api/models/{repo}/tree/{rev},
/api/models?search= (search), /api/whoami-v2 (a token's owner), HEAD and GET /{repo}/resolve/{rev}/{file} with
ETag, X-Repo-Commit and X-Linked-Size headers and byte ranges. Errors carry the Hub's X-Error-Code (RepoNotFound,
RevisionNotFound, GatedRepo, EntryNotFound). A gated repo answers 401 unless the request carries its token;
`drop_after` makes the next GET of a file close the connection after that many bytes (a lost connection mid-file),
`hold` makes a GET of a file stop halfway until the test lets it go on.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Repo:
    folder: Path
    commit: str
    gated: bool = False
    token: str | None = None  # the token that may read a gated repo

    def files(self) -> dict[str, Path]:
        return {p.relative_to(self.folder).as_posix(): p for p in sorted(self.folder.rglob("*")) if p.is_file()}


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    drop_after: dict[str, int] = field(default_factory=dict)  # file name -> bytes sent before the connection drops
    users: dict[str, str] = field(default_factory=dict)  # token -> the user it belongs to
    # file name -> an event: a GET of it sends half the file, then waits for the event before the rest (a slow link)
    hold: dict[str, threading.Event] = field(default_factory=dict)
    url: str = ""

    def add(self, repo_id: str, folder: Path, gated: bool = False, token: str | None = None) -> Repo:
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        self.repos[repo_id] = Repo(folder, commit, gated, token)
        if token:
            self.users[token] = "tiny-user"
        return self.repos[repo_id]

    def gets_of(self, name: str) -> list[tuple[str, str, str]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith("/" + name) and "/resolve/" in r[1]]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:  # noqa: N802
            self.route(head=True)

        def do_GET(self) -> None:  # noqa: N802
            self.route(head=False)

        def route(self, head: bool) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.requests.append((self.command, path, self.headers.get("Range", "")))
            if path == "/api/whoami-v2":
                return self.whoami()
            if path == "/api/models":
                return self.search(parse_qs(url.query).get("search", [""])[0])
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?(?:/.*)?", path)
            if api:
                return self.api(api.group(1), api.group(2), api.group(3) or "main")
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if resolve:
                return self.resolve(resolve.group(1), resolve.group(2), resolve.group(3), head)
            self.error(404, "RepoNotFound", "not found")

        def send_json(self, value: object, status: int = 200, headers: dict | None = None) -> None:
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, header in (headers or {}).items():
                self.send_header(key, header)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message}
            if commit:
                headers["X-Repo-Commit"] = commit
            self.send_json({"error": message}, status, headers)

        def repo_or_error(self, repo_id: str, revision: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self.error(401, "RepoNotFound", "Repository not found")
            elif revision not in ("main", repo.commit):
                self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            else:
                return repo
            return None

        def api(self, repo_id: str, what: str | None, revision: str) -> None:
            repo = self.repo_or_error(repo_id, revision)
            if repo is None:
                return
            files = repo.files()
            if what == "tree":
                return self.send_json([{"type": "file", "path": name, "size": p.stat().st_size, "oid": _sha1(p)}
                                       for name, p in files.items()])
            self.send_json({"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                            "gated": "auto" if repo.gated else False, "downloads": 7, "likes": 1,
                            "cardData": {"license": "apache-2.0"}, "tags": [],
                            "config": {"model_type": "llama"},
                            "siblings": [{"rfilename": name, "size": p.stat().st_size, "blobId": _sha1(p)}
                                         for name, p in files.items()]})

        def search(self, text: str) -> None:
            self.send_json([{"id": repo_id, "modelId": repo_id, "downloads": 7, "likes": 1,
                             "gated": "auto" if repo.gated else False, "cardData": {"license": "apache-2.0"},
                             "config": {"model_type": "llama"}, "safetensors": _safetensors_params(repo)}
                            for repo_id, repo in hub.repos.items() if text.lower() in repo_id.lower()])

        def whoami(self) -> None:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if token not in hub.users:
                return self.error(401, "", "Invalid credentials in Authorization header")
            self.send_json({"type": "user", "name": hub.users[token],
                            "auth": {"type": "access_token", "accessToken": {"displayName": "qlora-test",
                                                                             "role": "read"}}})

        def resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
            repo = self.repo_or_error(repo_id, revision)
            if repo is None:
                return
            if repo.gated and self.headers.get("Authorization") != f"Bearer {repo.token}":
                return self.error(401, "GatedRepo", "Access to this model is restricted", repo.commit)
            path = repo.files().get(name)
            if path is None:
                return self.error(404, "EntryNotFound", f"{name} does not exist", repo.commit)
            data = path.read_bytes()
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if ranged:
                start = int(ranged.group(1))
            self.send_response(206 if ranged else 200)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if head:
                return
            cut = hub.drop_after.pop(name, None)
            if cut is not None:
                self.wfile.write(data[start:start + cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            held = hub.hold.get(name)
            if held is not None:
                half = start + (len(data) - start) // 2
                try:
                    self.wfile.write(data[start:half])
                    self.wfile.flush()
                    held.wait(60)
                    self.wfile.write(data[half:])
                except OSError:  # the client went away while it waited (a cancelled download)
                    self.close_connection = True
                return
            self.wfile.write(data[start:])

    return Handler


def _safetensors_params(repo: Repo) -> dict | None:
    """What the Hub computes from the safetensors headers: parameters by dtype and their total."""
    by_dtype: dict[str, int] = {}
    for path in repo.folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                by_dtype[tensor["dtype"]] = by_dtype.get(tensor["dtype"], 0) + count
    return {"parameters": by_dtype, "total": sum(by_dtype.values())} if by_dtype else None


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def start(hub: FakeHub) -> tuple[FakeHub, ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hub, server
