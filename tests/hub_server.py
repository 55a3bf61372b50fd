"""A small Hugging Face Hub for tests: serves model and dataset folders in the Hub's URL layout, as huggingface_hub
(and `datasets`, through it) requests them.

GET /api/models/{repo}[/revision/{rev}] (model info, `?blobs=True` adds sizes), /api/models/{repo}/tree/{rev}[/{path}]
(`?recursive=true` lists below folders too), POST /api/models/{repo}/paths-info/{rev}, /api/models?search= (search),
/api/whoami-v2 (a token's owner), HEAD and GET /{repo}/resolve/{rev}/{file} with ETag, X-Repo-Commit and
X-Linked-Size headers and byte ranges; the same under /api/datasets/ and /datasets/{repo}/resolve/ for a repo added
with repo_type="dataset". Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, GatedRepo,
EntryNotFound). A gated repo's files answer 401 without a token and 403 with a token that is not its own;
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

API = re.compile(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.+))?)?")
RESOLVE = re.compile(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


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

    def add(self, repo_id: str, folder: Path, gated: bool = False, token: str | None = None,
            repo_type: str = "model") -> Repo:
        key = repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"  # as the Hub's URLs name it
        commit = hashlib.sha1(key.encode()).hexdigest()
        self.repos[key] = Repo(folder, commit, gated, token)
        if token:
            self.users[token] = "tiny-user"
        return self.repos[key]

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

        def do_POST(self) -> None:  # noqa: N802
            self.route(head=False)

        def route(self, head: bool) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.requests.append((self.command, path, self.headers.get("Range", "")))
            query = parse_qs(url.query)
            if path == "/api/whoami-v2":
                return self.whoami()
            if path == "/api/models":
                return self.search(query.get("search", [""])[0])
            # Matched before unquoting: a revision or a path in a tree request is one quoted segment ('/' as %2F).
            api = API.fullmatch(url.path)
            if api:
                kind, repo_id, what, revision, inner = (unquote(g) if g else g for g in api.groups())
                key = repo_id if kind == "models" else f"datasets/{repo_id}"
                if what == "paths-info":
                    return self.paths_info(key, revision)
                if what == "tree":
                    return self.tree(key, revision, inner or "", query.get("recursive", [""])[0] == "true")
                return self.api(key, revision or "main")
            resolve = RESOLVE.fullmatch(url.path)
            if resolve:
                prefix, repo_id, revision, name = (unquote(g or "") for g in resolve.groups())
                return self.resolve(prefix + repo_id, revision, name, head)
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

        def api(self, key: str, revision: str) -> None:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if token and token not in hub.users:  # the Hub: a token it doesn't know is refused on any repo
                return self.error(401, "", "Invalid credentials in Authorization header")
            repo = self.repo_or_error(key, revision)
            if repo is None:
                return
            files = repo.files()
            repo_id = key.removeprefix("datasets/")
            if key.startswith("datasets/"):
                return self.send_json({"id": repo_id, "sha": repo.commit, "private": False, "disabled": False,
                                       "gated": "auto" if repo.gated else False, "downloads": 7, "likes": 1,
                                       "cardData": {"license": "apache-2.0"}, "tags": [],
                                       "siblings": [{"rfilename": name, "size": p.stat().st_size,
                                                     "blobId": _sha1(p)} for name, p in files.items()]})
            self.send_json({"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                            "gated": "auto" if repo.gated else False, "downloads": 7, "likes": 1,
                            "cardData": {"license": "apache-2.0"}, "tags": [],
                            "config": {"model_type": "llama"},
                            "siblings": [{"rfilename": name, "size": p.stat().st_size, "blobId": _sha1(p)}
                                         for name, p in files.items()]})

        def tree(self, key: str, revision: str, inner: str, recursive: bool) -> None:
            """The entries below `inner` (a folder; '' is the repo's root): its files and folders, or everything
            below it with `recursive`."""
            repo = self.repo_or_error(key, revision)
            if repo is None:
                return
            entries = _entries(repo)
            prefix = inner.strip("/") + "/" if inner.strip("/") else ""
            if prefix and prefix.rstrip("/") not in entries:
                return self.error(404, "EntryNotFound", f"{inner} does not exist", repo.commit)
            below = [entry for path, entry in entries.items() if path.startswith(prefix)
                     and (recursive or "/" not in path[len(prefix):])]
            self.send_json(below)

        def paths_info(self, key: str, revision: str) -> None:
            """POST paths=…&paths=… (a form): the entries of those paths that exist."""
            repo = self.repo_or_error(key, revision)
            if repo is None:
                return
            form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
            entries = _entries(repo)
            self.send_json([entries[path] for path in form.get("paths", []) if path in entries])

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
            given = self.headers.get("Authorization", "")
            if repo.gated and given != f"Bearer {repo.token}":
                # The Hub: no token is 401; a token whose owner has not been granted access is 403.
                return self.error(403 if given else 401, "GatedRepo", f"Access to {repo_id} is restricted",
                                  repo.commit)
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


def _entries(repo: Repo) -> dict[str, dict]:
    """Every file and folder of the repo by path, as the tree and paths-info endpoints describe them."""
    entries: dict[str, dict] = {}
    for name, path in repo.files().items():
        parts = name.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            entries.setdefault(folder, {"type": "directory", "path": folder,
                                        "oid": hashlib.sha1(folder.encode()).hexdigest()})
        entries[name] = {"type": "file", "path": name, "size": path.stat().st_size, "oid": _sha1(path)}
    return entries


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
