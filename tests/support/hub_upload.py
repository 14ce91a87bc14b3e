"""The Hub stand-in's upload side: the routes `huggingface_hub` 2.4 (with `hf_xet`) calls to create a repo, a
branch and a commit, including the Xet content-addressed storage (CAS) that file bytes go through.

What the client does, read from its code and checked against this server (`tests/rwkv5/release/test_release.py`):

1. `POST /api/repos/create` (`{"name", "organization", "visibility"|"private", "type"}`); 409 when it exists.
2. `POST /api/{type}s/{repo}/branch/{branch}` (`{"startingPoint"}`); 409 when it exists.
3. `POST /api/validate-yaml` when a README.md is committed.
4. `POST /api/{type}s/{repo}/preupload/{rev}` (`{"files": [{"path", "sample", "size"}]}`): each file's
   `uploadMode` (`lfs` for large or binary-pattern files, else `regular`) and the remote `oid`, which lets the
   client drop unchanged files from the commit.
5. Xet: `GET /api/{type}s/{repo}/xet-write-token/{rev}` gives a CAS URL and a short-lived CAS token; then on the
   CAS (served here under `/v1/`): `GET /v1/chunks/...` (global dedup: always 404 here), `POST /v1/xorbs/default/
   {hash}` (serialized xorbs: chunks of `[version, compressed size (3 bytes LE), scheme, raw size (3 bytes LE)]`
   headers and LZ4/byte-grouped-LZ4/raw bodies), `POST /v1/shards` (an MDB shard: per file, the xorb chunk ranges
   that rebuild it and its sha256). `POST /v1/xorb-grants/...` and `/v2/shards` are answered 404; the client then
   falls back to the two routes above.
6. `POST /api/{type}s/{repo}/commit/{rev}` (NDJSON: header, `file` base64 items, `lfsFile` sha256 pointers,
   `deletedFile`): a new commit on the branch.

The shard route rebuilds every file from the stored xorbs and checks its sha256 against the shard's metadata,
so only bytes that went through the protocol intact become blobs; commits may point only at such blobs (or carry
regular files inline). Committed files are then served by the download routes of `tests.support.hub_server`
(resolve, CDN redirect for LFS files, tree, paths-info), so a release is read back through the same client.
The Hub token (when `hub.token` is set) is required on Hub routes; CAS routes take only the CAS token, so a test
can assert the Hub token never reaches the CAS.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hub_server import (
    DEFAULT_LFS_PATTERNS,
    HubFile,
    HubRepo,
    HubStandIn,
    Request,
    Response,
    _git_blob_oid,
    _lfs_pointer,
)

__all__ = ["HubUploads", "hub_uploads", "parse_shard", "decode_xorb_chunks"]

_KIND = r"(?P<kind>models|datasets|spaces)"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
# The Hub sends files of 10 MiB and more through LFS/Xet whatever their name.
_LFS_MIN_SIZE = 10 * 1024 * 1024
_SHARD_TAG_LEN = 32
_ENTRY = 48
_FLAG_VERIFICATION = 1 << 31
_FLAG_METADATA_EXT = 1 << 30
_BOOKEND = b"\xff" * 32


def _hash_hex(raw: bytes) -> str:
    """CAS API spelling of a 32-byte hash: each 8-byte word as a little-endian u64 in hex."""
    return "".join(f"{w:016x}" for w in struct.unpack("<4Q", raw))


def decode_xorb_chunks(data: bytes, end: int) -> list[bytes]:
    """The first `end` chunks of a serialized xorb, decompressed. Raises ValueError on a malformed xorb."""
    import lz4.frame

    chunks, pos = [], 0
    while len(chunks) < end:
        if pos + 8 > len(data):
            raise ValueError(f"xorb ends after {len(chunks)} chunks, {end} needed")
        version, scheme = data[pos], data[pos + 4]
        csize = int.from_bytes(data[pos + 1:pos + 4], "little")
        usize = int.from_bytes(data[pos + 5:pos + 8], "little")
        if version != 0:
            raise ValueError(f"chunk {len(chunks)}: header version {version}")
        body = data[pos + 8:pos + 8 + csize]
        pos += 8 + csize
        if scheme == 0:
            raw = body
        elif scheme in (1, 2):
            raw = lz4.frame.decompress(body)
            if scheme == 2:  # byte grouping: 4 planes of every 4th byte; planes 0..r-1 hold one extra byte
                n, rem = divmod(len(raw), 4)
                sizes = [n + (1 if i < rem else 0) for i in range(4)]
                planes, off = [], 0
                for s in sizes:
                    planes.append(raw[off:off + s])
                    off += s
                out = bytearray(len(raw))
                for i, plane in enumerate(planes):
                    out[i::4] = plane
                raw = bytes(out)
        else:
            raise ValueError(f"chunk {len(chunks)}: unknown compression scheme {scheme}")
        if len(raw) != usize:
            raise ValueError(f"chunk {len(chunks)}: {len(raw)} bytes after decompression, header says {usize}")
        chunks.append(raw)
    return chunks


def parse_shard(data: bytes) -> list[dict]:
    """Files of an uploaded MDB shard: [{"hash", "segments": [(xorb hash, start, end, bytes)], "sha256"}]."""
    if len(data) < 48:
        raise ValueError("shard shorter than its header")
    version = struct.unpack_from("<Q", data, _SHARD_TAG_LEN)[0]
    if version != 2:
        raise ValueError(f"shard header version {version}, expected 2")
    files, pos = [], 48
    while True:
        if pos + _ENTRY > len(data):
            raise ValueError("shard file section has no bookend")
        file_hash = data[pos:pos + 32]
        flags, n = struct.unpack_from("<II", data, pos + 32)
        pos += _ENTRY
        if file_hash == _BOOKEND:
            return files
        segments = []
        for _ in range(n):
            cas = data[pos:pos + 32]
            _, seg_bytes, start, end = struct.unpack_from("<IIII", data, pos + 32)
            segments.append((_hash_hex(cas), start, end, seg_bytes))
            pos += _ENTRY
        if flags & _FLAG_VERIFICATION:
            pos += n * _ENTRY
        sha256 = None
        if flags & _FLAG_METADATA_EXT:
            # Stored like every hash in a shard: four u64 words, so it reads back through the same conversion.
            sha256 = _hash_hex(data[pos:pos + 32])
            pos += _ENTRY
        files.append({"hash": _hash_hex(file_hash), "segments": segments, "sha256": sha256})


class HubUploads:
    """Adds the upload routes to a `HubStandIn`; uploaded bytes live under `storage`.

    Args:
        hub: a started stand-in.
        storage: folder for xorbs and rebuilt blobs.
    """

    def __init__(self, hub: HubStandIn, storage: str | Path) -> None:
        self.hub = hub
        self.storage = Path(storage)
        (self.storage / "xorbs").mkdir(parents=True, exist_ok=True)
        (self.storage / "blobs").mkdir(parents=True, exist_ok=True)
        self.cas_tokens: set[str] = set()
        self.blobs: dict[str, HubFile] = {}
        self._lock = threading.Lock()
        hub.add_route("repo_create", "POST", r"^/api/repos/create$", self._create_repo)
        hub.add_route("validate_yaml", "POST", r"^/api/validate-yaml$", self._validate_yaml)
        hub.add_route("branch", "POST", rf"^/api/{_KIND}/{_REPO}/branch/(?P<branch>[^/]+)$", self._branch)
        hub.add_route("preupload", "POST", rf"^/api/{_KIND}/{_REPO}/preupload/(?P<rev>[^/]+)$", self._preupload)
        hub.add_route("commit", "POST", rf"^/api/{_KIND}/{_REPO}/commit/(?P<rev>[^/]+)$", self._commit)
        hub.add_route("xet_token", "GET", rf"^/api/{_KIND}/{_REPO}/xet-(?P<scope>read|write)-token/(?P<rev>[^/]+)$",
                      self._xet_token)
        hub.add_route("cas_dedup", "GET", r"^/v1/chunks/(?P<prefix>[^/]+)/(?P<hash>[0-9a-f]{64})$", self._cas_dedup,
                      needs_auth=False)
        hub.add_route("xorb", "POST", r"^/v1/xorbs/(?P<prefix>[^/]+)/(?P<hash>[0-9a-f]{64})$", self._xorb,
                      needs_auth=False)
        hub.add_route("shard", "POST", r"^/v1/shards$", self._shard, needs_auth=False)

    def reset(self) -> None:
        """Forget uploaded blobs and CAS tokens (the stand-in's own `reset` forgets repos)."""
        with self._lock:
            self.blobs.clear()
            self.cas_tokens.clear()

    def repo(self, repo_id: str, repo_type: str = "model") -> HubRepo:
        return self.hub.repos[(repo_type, repo_id)]

    def corrupt(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> None:
        """Flip the last byte of a committed file's stored bytes (size unchanged), as bit rot on the Hub would."""
        repo = self.repo(repo_id, repo_type)
        f = repo.files_at(repo.resolve(revision))[path]
        data = bytearray(f.source.read_bytes())
        data[-1] ^= 0x01
        f.source.write_bytes(bytes(data))

    def _cas_ok(self, request: Request) -> Response | None:
        auth = request.headers.get("Authorization") or ""
        if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in self.cas_tokens:
            return Response.error(401, "invalid or missing CAS token")
        return None

    def _store_blob(self, data: bytes, path: str, lfs: bool) -> HubFile:
        sha = hashlib.sha256(data).hexdigest()
        source = self.storage / "blobs" / sha
        if not source.exists():
            tmp = source.with_name(f".{sha}.tmp-{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(source)
        oid = _git_blob_oid(_lfs_pointer(sha, len(data)) if lfs else data)
        return HubFile(path, len(data), sha, oid, lfs, source)

    def _find_repo(self, groups: dict[str, str]) -> tuple[HubRepo | None, Response | None]:
        repo_type = (groups.get("kind") or "models")[:-1]
        repo = self.hub.repos.get((repo_type, groups["repo"]))
        if repo is None:
            return None, Response.error(404, f"Repository not found: {groups['repo']}", "RepoNotFound")
        return repo, None

    def _new_commit(self, repo: HubRepo, branch: str, files: dict[str, HubFile], message: str) -> str:
        parent = repo.branches.get(branch, "")
        listing = "".join(f"{p} {f.git_oid}\n" for p, f in sorted(files.items()))
        commit = hashlib.sha1(f"{parent}\n{message}\n{listing}".encode()).hexdigest()
        repo.history[commit] = files
        repo.branches[branch] = commit
        if branch == "main":
            repo.commit, repo.files = commit, files
        return commit

    def _create_repo(self, request: Request, groups: dict[str, str]) -> Response:
        body = json.loads(request.body or b"{}")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        repo_type = body.get("type") or "model"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub.repos:
                # The Hub's 409 carries the URL too; `create_repo(exist_ok=True)` returns it.
                conflict = Response.error(409, "You already created this model repo", "RepoExists")
                conflict.body = json.dumps({"error": "You already created this model repo",
                                            "url": f"{request.base_url}/{prefix}{repo_id}"}).encode()
                return conflict
            private = body.get("visibility", "private" if body.get("private") else "public") == "private"
            gitattributes = self._store_blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                                             ".gitattributes", False)
            files = {".gitattributes": gitattributes}
            repo = HubRepo(repo_type, repo_id, "", {}, private=private)
            repo.history.clear()
            self._new_commit(repo, "main", files, "initial commit")
            self.hub.repos[(repo_type, repo_id)] = repo
        return Response.json({"url": f"{request.base_url}/{prefix}{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, request: Request, groups: dict[str, str]) -> Response:
        content = json.loads(request.body).get("content", "")
        if content.startswith("---") and content.count("---") < 2:
            return Response.json({"errors": [{"message": "unterminated YAML front matter"}]}, 400)
        return Response.json({"errors": [], "warnings": []})

    def _branch(self, request: Request, groups: dict[str, str]) -> Response:
        repo, error = self._find_repo(groups)
        if error:
            return error
        body = json.loads(request.body or b"{}")
        with self.hub._lock:
            if groups["branch"] in repo.branches:
                return Response.error(409, f"Reference already exists: refs/heads/{groups['branch']}")
            start = repo.resolve(body.get("startingPoint") or "main")
            if start is None:
                return Response.error(404, f"Invalid rev id: {body.get('startingPoint')}", "RevisionNotFound")
            repo.branches[groups["branch"]] = start
        return Response.json({})

    def _preupload(self, request: Request, groups: dict[str, str]) -> Response:
        repo, error = self._find_repo(groups)
        if error:
            return error
        commit = repo.resolve(groups["rev"])
        if commit is None:
            return Response.error(404, f"Invalid rev id: {groups['rev']}", "RevisionNotFound")
        current = repo.files_at(commit)
        out = []
        for f in json.loads(request.body)["files"]:
            name = f["path"].rsplit("/", 1)[-1]
            lfs = f["size"] >= _LFS_MIN_SIZE or any(fnmatch.fnmatchcase(name, p) for p in DEFAULT_LFS_PATTERNS)
            have = current.get(f["path"])
            oid = None if have is None else (have.sha256 if have.lfs else have.git_oid)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        return Response.json({"files": out, "commitOid": commit})

    def _xet_token(self, request: Request, groups: dict[str, str]) -> Response:
        repo, error = self._find_repo(groups)
        if error:
            return error
        token = "xet_" + secrets.token_hex(8)
        with self._lock:
            self.cas_tokens.add(token)
        return Response.json({"accessToken": token, "exp": int(time.time()) + 3600, "casUrl": request.base_url})

    def _cas_dedup(self, request: Request, groups: dict[str, str]) -> Response:
        return self._cas_ok(request) or Response.error(404, "chunk not tracked by global dedup")

    def _xorb(self, request: Request, groups: dict[str, str]) -> Response:
        denied = self._cas_ok(request)
        if denied:
            return denied
        path = self.storage / "xorbs" / groups["hash"]
        existed = path.exists()
        if not existed:
            tmp = path.with_name(f".{groups['hash']}.tmp-{threading.get_ident()}")
            tmp.write_bytes(request.body)
            tmp.replace(path)
        return Response.json({"was_inserted": not existed})

    def _shard(self, request: Request, groups: dict[str, str]) -> Response:
        denied = self._cas_ok(request)
        if denied:
            return denied
        try:
            files = parse_shard(request.body)
            for f in files:
                parts = []
                for xorb, start, end, seg_bytes in f["segments"]:
                    source = self.storage / "xorbs" / xorb
                    if not source.exists():
                        return Response.error(400, f"shard references unknown xorb {xorb}")
                    segment = b"".join(decode_xorb_chunks(source.read_bytes(), end)[start:end])
                    if len(segment) != seg_bytes:
                        return Response.error(400, f"xorb {xorb}[{start}:{end}] holds {len(segment)} bytes, "
                                                   f"shard says {seg_bytes}")
                    parts.append(segment)
                data = b"".join(parts)
                sha = hashlib.sha256(data).hexdigest()
                if f["sha256"] is not None and f["sha256"] != sha:
                    return Response.error(400, f"file {f['hash']}: rebuilt sha256 {sha}, shard says {f['sha256']}")
                blob = self._store_blob(data, "", True)
                with self._lock:
                    self.blobs[sha] = blob
        except ValueError as exc:
            return Response.error(400, f"malformed shard or xorb: {exc}")
        return Response.json({"result": 1})

    def _commit(self, request: Request, groups: dict[str, str]) -> Response:
        repo, error = self._find_repo(groups)
        if error:
            return error
        branch = groups["rev"]
        lines = [json.loads(line) for line in request.body.decode().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        with self.hub._lock:
            if branch not in repo.branches:
                return Response.error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            files = dict(repo.files_at(repo.branches[branch]))
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    blob = self._store_blob(base64.b64decode(value["content"]), value["path"], False)
                    files[value["path"]] = blob
                elif key == "lfsFile":
                    with self._lock:
                        blob = self.blobs.get(value["oid"])
                    if blob is None:
                        return Response.error(422, f"Your push was rejected because an LFS pointer pointed to a "
                                                   f"file that does not exist: {value['path']} ({value['oid']})")
                    files[value["path"]] = HubFile(value["path"], blob.size, blob.sha256, blob.git_oid, True,
                                                   blob.source)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        return Response.error(404, f"A file with this name doesn't exist: {value['path']}")
            commit = self._new_commit(repo, branch, files, header.get("summary", ""))
            for f in files.values():
                if f.lfs:
                    self.hub._blobs[f.sha256] = f
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return Response.json({"success": True, "commitOid": commit, "pullRequestUrl": None,
                              "commitUrl": f"{request.base_url}/{prefix}{repo.repo_id}/commit/{commit}"})


@pytest.fixture(scope="module")
def hub_uploads(tmp_path_factory) -> Iterator[HubUploads]:
    """A stand-in with upload routes for the test module; emptied by the test (`hub.reset()`, `uploads.reset()`)."""
    with HubStandIn() as server:
        yield HubUploads(server, tmp_path_factory.mktemp("hub-storage"))
