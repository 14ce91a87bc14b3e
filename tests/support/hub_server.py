"""A stand-in for the Hugging Face Hub: a real HTTP server on 127.0.0.1 serving repos from local directories.

It speaks the routes `huggingface_hub` 2.4 calls to list and download a repo, so tests exercise the real client
code, its URL building, pagination and header parsing, instead of mocks:

- `GET /api/{datasets|models}/{repo}[/revision/{rev}]`: repo info (`sha`, `siblings`; sizes and LFS with `blobs`).
- `GET /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=&expand=&cursor=`: tree listing, paginated with a
  `Link: <...>; rel="next"` header like the Hub (cursor-based, `page_size` entries per page).
- `POST /api/{type}s/{repo}/paths-info/{rev}` (form body `paths=...`): entries with LFS sha256.
- `HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}`: `ETag`, `X-Repo-Commit`, `Content-Length`, `Range`.
  LFS files answer 302 to a "CDN" route on another origin (`localhost` instead of `127.0.0.1`) with
  `X-Linked-Etag`/`X-Linked-Size`, as the Hub does: the client must not forward its token there and must take the
  metadata from the redirect itself.

Faults are injected per test with `HubStandIn.inject(Fault(...))`: status codes (500, 429 with `Retry-After`),
slow responses (before the headers, or stalled mid-body), truncated bodies (full `Content-Length`, half the bytes, connection closed) and wrong bytes (same
size, different sha256). `hub.token = "..."` makes every Hub route answer 401 without `Authorization: Bearer`.
Every request is recorded (`hub.requests`, `hub.count(...)`), so tests can assert what was (not) downloaded.

Routes live in a table; later stages add theirs (e.g. the upload routes of the release stage) with
`add_route(name, methods, pattern, handler)`, which takes precedence over the built-in ones.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = [
    "Fault",
    "HubFile",
    "HubRepo",
    "HubStandIn",
    "Request",
    "RequestRecord",
    "Response",
    "Route",
    "hub",
    "hub_server",
]

# Files stored through git-lfs on the real Hub (SlimPajama's .jsonl.zst are); others are plain git blobs.
DEFAULT_LFS_PATTERNS = ("*.zst", "*.parquet", "*.arrow", "*.bin", "*.safetensors", "*.pt", "*.pth", "*.gz")
_LFS_POINTER_SIZE = 134
_TYPE_FROM_PLURAL = {"datasets": "dataset", "models": "model", "spaces": "space"}


@dataclass(frozen=True)
class HubFile:
    """One file of a served repo.

    Args:
        path: path in the repo, `/`-separated.
        size: size in bytes.
        sha256: hex sha256 of the content (the LFS oid).
        git_oid: git blob id (of the content, or of the LFS pointer for LFS files).
        lfs: whether the Hub would store it through LFS (then resolve redirects to the CDN route).
        source: where its bytes are on disk.
    """

    path: str
    size: int
    sha256: str
    git_oid: str
    lfs: bool
    source: Path

    def tree_entry(self) -> dict:
        entry: dict = {"type": "file", "oid": self.git_oid, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": _LFS_POINTER_SIZE}
        return entry


@dataclass
class HubRepo:
    """A repo: its latest commit (`commit`, `files`), branch and tag names, and every earlier commit's files.

    Repos served from a folder (`add_repo`) have one commit; the upload routes (`tests.support.hub_upload`) add
    commits, branches and tags.
    """

    repo_type: str
    repo_id: str
    commit: str
    files: dict[str, HubFile]
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    history: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    private: bool = False

    def __post_init__(self) -> None:
        self.history.setdefault(self.commit, self.files)

    def resolve(self, revision: str) -> str | None:
        """Commit sha for a branch or tag name or a known commit; None when unknown."""
        if revision in self.history:
            return revision
        return self.branches.get(revision) or self.tags.get(revision)

    def files_at(self, commit: str) -> dict[str, HubFile]:
        return self.history[commit]

    def directories(self, commit: str | None = None) -> set[str]:
        files = self.files if commit is None else self.history[commit]
        return {p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)}


@dataclass
class Request:
    """What a route handler sees: raw path (still percent-encoded), parsed query, headers, body."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    base_url: str


@dataclass
class Response:
    """What a route handler returns. For HEAD the body is used only for `Content-Length`."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def json(cls, obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode())

    @classmethod
    def error(cls, status: int, message: str, error_code: str | None = None) -> Response:
        headers = {"X-Error-Code": error_code} if error_code else {}
        return cls.json({"error": message}, status, {**headers, "X-Error-Message": message})


@dataclass(frozen=True)
class Route:
    """A route: `handler(request, groups)` answers requests whose method and raw path match.

    Args:
        name: used in request records and to target faults.
        methods: HTTP methods served.
        pattern: regex over the raw path (no query); named groups reach the handler percent-decoded.
        handler: returns a `Response`.
        needs_auth: whether `hub.token` (when set) is required; False for the CDN (signed URLs on the Hub).
        path_of: repo path a request concerns (for fault matching and records); default: the `path` group.
    """

    name: str
    methods: frozenset[str]
    pattern: re.Pattern
    handler: Callable[[Request, dict[str, str]], Response]
    needs_auth: bool = True
    path_of: Callable[[dict[str, str]], str | None] | None = None


@dataclass
class Fault:
    """A fault injected into matching requests, `times` times (None: every time).

    Args:
        kind: `status` answers `status` without running the handler, with `Retry-After: retry_after` and/or
            the Hub's exhausted-quota header `RateLimit: "resolvers";r=0;t=ratelimit_reset` if set;
            `slow` sleeps `delay` seconds before answering; `stall` sends half the body, then sleeps `delay`
            seconds before the rest; `truncate` sends the full `Content-Length` but half the body, then closes
            the connection; `wrong_bytes` flips the last byte (same size, other sha256).
        routes: route names it applies to; bytes are served by `resolve` (non-LFS) and `cdn` (LFS).
        path: fnmatch pattern over the repo path of the request.
        methods: HTTP methods it applies to.
    """

    kind: Literal["status", "slow", "stall", "truncate", "wrong_bytes"]
    routes: tuple[str, ...] = ("resolve", "cdn")
    path: str = "*"
    methods: tuple[str, ...] = ("GET",)
    times: int | None = 1
    status: int = 500
    retry_after: str | None = None
    ratelimit_reset: int | None = None
    delay: float = 0.0
    hits: int = 0

    def matches(self, route: str, method: str, path: str | None) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return route in self.routes and method in self.methods and fnmatch.fnmatchcase(path or "", self.path)


@dataclass
class RequestRecord:
    """One request as the server saw it."""

    method: str
    route: str
    path: str | None
    status: int = 0
    authorized: bool = False
    range: str | None = None
    fault: str | None = None
    at: float = field(default_factory=time.monotonic)


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a `bytes=a-b` / `bytes=a-` header; None when absent or not satisfiable."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", (header or "").strip())
    if not match:
        return None
    start = int(match[1])
    end = int(match[2]) if match[2] else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class HubStandIn:
    """The server. Use as a context manager (or `start()`/`stop()`); `url` is the endpoint for `HF_ENDPOINT`.

    Args:
        page_size: tree entries per page (the Hub uses 1000); small values exercise pagination.
        redirect_lfs: LFS files answer resolve with a 302 to the CDN route (as the Hub does).
    """

    def __init__(self, *, page_size: int = 1000, redirect_lfs: bool = True) -> None:
        self.page_size = page_size
        self.redirect_lfs = redirect_lfs
        self.token: str | None = None
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.requests: list[RequestRecord] = []
        self.faults: list[Fault] = []
        self._blobs: dict[str, HubFile] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._routes: list[Route] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._add_builtin_routes()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the Hub stand-in is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_url(self) -> str:
        # Same server, other origin: the client treats it as a foreign host (no token, metadata from the 302).
        return f"http://localhost:{self.port}"

    def start(self) -> HubStandIn:
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_repo(
        self,
        repo_id: str,
        directory: str | Path,
        *,
        repo_type: str = "dataset",
        branch: str = "main",
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
    ) -> HubRepo:
        """Serve every file under `directory` as `repo_id` at a commit derived from the content.

        Re-adding a repo replaces it with a new commit (the old one is no longer served).
        """
        root = Path(directory)
        files: dict[str, HubFile] = {}
        for source in sorted(p for p in root.rglob("*") if p.is_file()):
            path = source.relative_to(root).as_posix()
            data = source.read_bytes()
            sha256 = hashlib.sha256(data).hexdigest()
            lfs = any(fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pat) for pat in lfs_patterns)
            oid = _git_blob_oid(_lfs_pointer(sha256, len(data)) if lfs else data)
            files[path] = HubFile(path, len(data), sha256, oid, lfs, source)
        commit = hashlib.sha1("".join(f"{p} {f.git_oid}\n" for p, f in files.items()).encode()).hexdigest()
        repo = HubRepo(repo_type, repo_id, commit, files, {branch: commit})
        with self._lock:
            self.repos[(repo_type, repo_id)] = repo
            for f in files.values():
                self._blobs[f.sha256] = f
        return repo

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def reset(self) -> None:
        """Forget repos, faults, recorded requests and the token; restore default paging and redirects."""
        with self._lock:
            self.repos.clear()
            self._blobs.clear()
            self.faults.clear()
            self.requests.clear()
        self.token = None
        self.page_size = 1000
        self.redirect_lfs = True

    def count(self, route: str | None = None, method: str | None = None, path: str | None = None) -> int:
        """Requests recorded so far, filtered by route name, method and repo path (fnmatch)."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (route is None or r.route == route)
                and (method is None or r.method == method)
                and (path is None or fnmatch.fnmatchcase(r.path or "", path))
            )

    def downloads(self) -> list[str]:
        """Repo paths whose bytes were sent (200/206 GETs on `resolve` or `cdn`, faulted ones too), in order."""
        with self._lock:
            return [
                r.path
                for r in self.requests
                if r.method == "GET" and r.route in ("resolve", "cdn") and r.status in (200, 206) and r.path
            ]

    def add_route(
        self,
        name: str,
        methods: tuple[str, ...] | str,
        pattern: str,
        handler: Callable[[Request, dict[str, str]], Response],
        *,
        needs_auth: bool = True,
        path_of: Callable[[dict[str, str]], str | None] | None = None,
    ) -> None:
        """Serve `pattern` (a regex over the raw path) with `handler`, ahead of the built-in routes."""
        methods = (methods,) if isinstance(methods, str) else methods
        route = Route(name, frozenset(methods), re.compile(pattern), handler, needs_auth, path_of)
        with self._lock:
            self._routes.insert(0, route)

    def _add_builtin_routes(self) -> None:
        kind = r"(?P<kind>datasets|models|spaces)"
        repo = r"(?P<repo>[^/]+/[^/]+)"
        self.add_route("cdn", ("GET", "HEAD"), r"^/cdn/(?P<sha>[0-9a-f]{64})$", self._cdn, needs_auth=False,
                       path_of=self._cdn_path)
        self.add_route("resolve", ("GET", "HEAD"),
                       rf"^/(?:(?P<kind>datasets|spaces)/)?{repo}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", self._resolve)
        self.add_route("paths_info", "POST", rf"^/api/{kind}/{repo}/paths-info/(?P<rev>[^/]+)$", self._paths_info)
        self.add_route("tree", "GET", rf"^/api/{kind}/{repo}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", self._tree)
        self.add_route("revision", "GET", rf"^/api/{kind}/{repo}(?:/revision/(?P<rev>[^/]+))?$", self._repo_info)

    def _find(self, groups: dict[str, str]) -> tuple[HubRepo | None, str | None, Response | None]:
        """The repo and commit a request names, or the 404 the Hub would answer."""
        repo_type = _TYPE_FROM_PLURAL.get(groups.get("kind") or "models", "model")
        repo = self.repos.get((repo_type, groups["repo"]))
        if repo is None:
            return None, None, Response.error(404, f"Repository not found: {groups['repo']}", "RepoNotFound")
        commit = repo.resolve(groups.get("rev") or "main")
        if commit is None:
            return None, None, Response.error(404, f"Invalid rev id: {groups.get('rev')}", "RevisionNotFound")
        return repo, commit, None

    def _repo_info(self, request: Request, groups: dict[str, str]) -> Response:
        repo, commit, error = self._find(groups)
        if error:
            return error
        blobs = request.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for f in repo.files_at(commit).values():
            sibling: dict = {"rfilename": f.path}
            if blobs:
                sibling.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": _LFS_POINTER_SIZE}
            siblings.append(sibling)
        return Response.json({"_id": commit[:24], "id": repo.repo_id, "author": repo.repo_id.split("/")[0],
                              "sha": commit, "private": repo.private or self.token is not None, "gated": False, "disabled": False,
                              "lastModified": "2023-06-01T00:00:00.000Z", "tags": [], "siblings": siblings})

    def _tree(self, request: Request, groups: dict[str, str]) -> Response:
        repo, commit, error = self._find(groups)
        if error:
            return error
        files = repo.files_at(commit)
        base = (groups.get("path") or "").strip("/")
        recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        dirs = repo.directories(commit)
        if base and base not in dirs:
            return Response.error(404, f"Entry not found: {base}", "EntryNotFound")
        prefix = f"{base}/" if base else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

        entries = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs) if wanted(d)]
        entries += [f.tree_entry() for p, f in sorted(files.items()) if wanted(p)]
        start = int(request.query.get("cursor", ["0"])[0])
        page = entries[start:start + self.page_size]
        headers = {}
        if start + self.page_size < len(entries):
            query = f"recursive={recursive}&expand=False&cursor={start + self.page_size}"
            headers["Link"] = f'<{request.base_url}{request.path}?{query}>; rel="next"'
        return Response.json(page, headers=headers)

    def _paths_info(self, request: Request, groups: dict[str, str]) -> Response:
        repo, commit, error = self._find(groups)
        if error:
            return error
        files = repo.files_at(commit)
        form = parse_qs(request.body.decode())
        dirs = repo.directories(commit)
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in files:
                out.append(files[path].tree_entry())
            elif path in dirs:
                out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path})
        return Response.json(out)

    def _resolve(self, request: Request, groups: dict[str, str]) -> Response:
        repo, commit, error = self._find(groups)
        if error:
            return error
        f = repo.files_at(commit).get(groups["path"])
        if f is None:
            return Response.error(404, f"Entry not found: {groups['path']}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs and self.redirect_lfs:
            headers.update({"ETag": f'"{f.git_oid}"', "X-Linked-Etag": f'"{f.sha256}"',
                            "X-Linked-Size": str(f.size), "Location": f"{self.cdn_url}/cdn/{f.sha256}"})
            return Response(302, headers)
        headers["ETag"] = f'"{f.sha256 if f.lfs else f.git_oid}"'
        return _serve_bytes(f, request, headers)

    def _cdn_path(self, groups: dict[str, str]) -> str | None:
        blob = self._blobs.get(groups["sha"])
        return blob.path if blob else None

    def _cdn(self, request: Request, groups: dict[str, str]) -> Response:
        f = self._blobs.get(groups["sha"])
        if f is None:
            return Response.error(404, "NoSuchKey")
        name = f.path.rsplit("/", 1)[-1]
        headers = {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f'inline; filename="{name}"'}
        return _serve_bytes(f, request, headers)

    def _take_fault(self, kinds: tuple[str, ...], route: str, method: str, path: str | None) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.kind in kinds and fault.matches(route, method, path):
                    fault.hits += 1
                    return fault
        return None

    def _match(self, method: str, raw_path: str) -> tuple[Route | None, dict[str, str]]:
        with self._lock:
            routes = list(self._routes)
        for route in routes:
            match = route.pattern.match(raw_path)
            if match and method in route.methods:
                return route, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        return None, {}


def _serve_bytes(f: HubFile, request: Request, headers: dict[str, str]) -> Response:
    data = f.source.read_bytes()
    if "Range" not in request.headers:
        return Response(200, headers, data)
    span = _parse_range(request.headers["Range"], len(data))
    if span is None:
        return Response(416, {**headers, "Content-Range": f"bytes */{len(data)}"})
    start, end = span
    return Response(206, {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}, data[start:end + 1])


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # Clients that time out on a slow response close their socket; the late write fails. Expected, not news.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubStandIn

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        host = self.headers.get("Host") or f"127.0.0.1:{hub.port}"
        request = Request(self.command, split.path, parse_qs(split.query), self.headers, body, f"http://{host}")
        route, groups = hub._match(self.command, split.path)
        if route is None:
            self._send(Response.error(404, f"no route for {self.command} {split.path}"), None)
            return
        path = route.path_of(groups) if route.path_of else groups.get("path")
        authorized = hub.token is not None and self.headers.get("Authorization") == f"Bearer {hub.token}"
        record = RequestRecord(self.command, route.name, path, authorized=authorized, range=self.headers.get("Range"))
        with hub._lock:
            hub.requests.append(record)
        if route.needs_auth and hub.token is not None and not authorized:
            self._send(Response.error(401, "Invalid credentials in Authorization header"), record)
            return
        fault = hub._take_fault(("status", "slow"), route.name, self.command, path)
        if fault is not None and fault.kind == "status":
            record.fault = "status"
            response = Response.error(fault.status, f"injected {fault.status}")
            if fault.retry_after is not None:
                response.headers["Retry-After"] = fault.retry_after
            if fault.ratelimit_reset is not None:
                response.headers["RateLimit"] = f'"resolvers";r=0;t={fault.ratelimit_reset}'
                response.headers["RateLimit-Policy"] = '"fixed window";"resolvers";q=3000;w=300'
            self._send(response, record)
            return
        if fault is not None:
            record.fault = "slow"
            if hub._stopping.wait(fault.delay):
                return
        response = route.handler(request, groups)
        body_fault = None
        if self.command == "GET" and response.body:
            body_fault = hub._take_fault(("stall", "truncate", "wrong_bytes"), route.name, self.command, path)
            if body_fault is not None:
                record.fault = body_fault.kind
            if body_fault is not None and body_fault.kind == "wrong_bytes":
                response.body = response.body[:-1] + bytes([response.body[-1] ^ 0x01])
        self._send(response, record, body_fault=body_fault)

    def _send(self, response: Response, record: RequestRecord | None, *, body_fault: Fault | None = None) -> None:
        truncate = body_fault is not None and body_fault.kind == "truncate"
        if record is not None:
            record.status = response.status
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        if truncate:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if body_fault is not None and body_fault.kind in ("truncate", "stall"):
            half = len(response.body) // 2
            self.wfile.write(response.body[:half])
            self.wfile.flush()
            if truncate:
                self.close_connection = True
                return
            if self.hub._stopping.wait(body_fault.delay):
                return
            self.wfile.write(response.body[half:])
            return
        self.wfile.write(response.body)


@pytest.fixture(scope="module")
def hub_server() -> Iterator[HubStandIn]:
    """One stand-in per test module (starting it is cheap, but threads add up)."""
    with HubStandIn() as server:
        yield server


@pytest.fixture
def hub(hub_server: HubStandIn) -> Iterator[HubStandIn]:
    """The module's stand-in, emptied before and after each test (repos, faults, token, request log)."""
    hub_server.reset()
    yield hub_server
    hub_server.reset()
