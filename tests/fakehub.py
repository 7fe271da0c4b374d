"""A local stand-in for the Hugging Face and ModelScope hubs, for the real hub libraries to talk to.

It speaks the subset of both HTTP APIs that `huggingface_hub` and `modelscope_hub` call for a pull
(repo info, file listings with sizes and checksums, file downloads with Range, search, the not-found
answers each hub gives), so tests point the libraries at it through their own endpoint variables
(HF_ENDPOINT, MODELSCOPE_ENDPOINT) and nothing is mocked on the client side.

A repo may list hostile file names (`../../x`, absolute paths): the fake serves them like any file, as
a malicious mirror would, so tests see what a client writes. Failure injection, per repo file:
`drop_after` (close the connection mid-body), `corrupt` (flip a byte, same length), `stall_after`
(hold the connection until released, for kill-and-resume tests).
Every request is recorded so tests can assert what the libraries asked for (e.g. a Range).
"""

from __future__ import annotations

import asyncio
import hashlib
import posixpath
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

CHUNK = 256 * 1024
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".onnx", ".pt", ".pth", ".h5", ".msgpack")
MS_DEFAULT_REVISION = "master"
HF_DEFAULT_REVISION = "main"

_digest_cache: dict[tuple[str, int], tuple[str, str]] = {}


def _digests(source: Path, size: int) -> tuple[str, str]:
    """(sha256, git blob sha1) of the first `size` bytes of `source`; cached, files are large."""
    key = (str(source), size)
    if key not in _digest_cache:
        sha256 = hashlib.sha256()
        sha1 = hashlib.sha1(f"blob {size}\0".encode())
        with source.open("rb") as fh:
            left = size
            while left:
                block = fh.read(min(8 << 20, left))
                if not block:
                    break
                sha256.update(block)
                sha1.update(block)
                left -= len(block)
        _digest_cache[key] = (sha256.hexdigest(), sha1.hexdigest())
    return _digest_cache[key]


@dataclass
class HubFile:
    path: str
    source: Path
    limit: int | None = None  # serve only the first `limit` bytes of `source`

    @property
    def size(self) -> int:
        full = self.source.stat().st_size
        return full if self.limit is None else min(full, self.limit)

    @property
    def lfs(self) -> bool:
        return self.path.lower().endswith(LFS_SUFFIXES)

    @property
    def sha256(self) -> str:
        return _digests(self.source, self.size)[0]

    @property
    def git_oid(self) -> str:
        """What the hub calls the file's oid: the git blob of the content, or of the LFS pointer."""
        if not self.lfs:
            return _digests(self.source, self.size)[1]
        pointer = f"version lfs/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()
        return hashlib.sha1(f"blob {len(pointer)}\0".encode() + pointer).hexdigest()

    def content(self) -> bytes:
        with self.source.open("rb") as fh:
            return fh.read(self.size)


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @property
    def commit(self) -> str:
        return hashlib.sha1(("commit:" + self.repo_id).encode()).hexdigest()

    def knows_revision(self, revision: str | None) -> bool:
        return revision in (None, "", HF_DEFAULT_REVISION, MS_DEFAULT_REVISION, self.commit, *self.tags)

    def directories(self) -> list[str]:
        dirs = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return sorted(dirs)


@dataclass
class Fault:
    kind: str  # "drop" | "corrupt" | "stall"
    path: str
    after: int = 0
    times: int | None = 1  # None: every request
    hits: int = 0
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    range: str | None
    status: int = 0


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.faults: list[Fault] = []
        self.requests: list[Recorded] = []
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn_url = f"http://localhost:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # --- content ------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, Path | tuple[Path, int]], tags: tuple[str, ...] = ()) -> HubRepo:
        repo = HubRepo(repo_id, tags=tags)
        for path, spec in files.items():
            source, limit = spec if isinstance(spec, tuple) else (spec, None)
            repo.files[path] = HubFile(path, Path(source), limit)
        self.repos[repo_id.lower()] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, tags: tuple[str, ...] = ()) -> HubRepo:
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_repo(repo_id, files, tags=tags)

    def repo(self, repo_id: str) -> HubRepo | None:
        return self.repos.get(repo_id.lower())

    # --- failure injection --------------------------------------------------------------
    def drop_after(self, path: str, nbytes: int, times: int | None = 1) -> Fault:
        return self._fault(Fault("drop", path, nbytes, times))

    def corrupt(self, path: str, at: int = 1000, times: int | None = 1) -> Fault:
        return self._fault(Fault("corrupt", path, at, times))

    def stall_after(self, path: str, nbytes: int) -> Fault:
        return self._fault(Fault("stall", path, nbytes, 1))

    def _fault(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def _take_fault(self, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.path == path and (fault.times is None or fault.hits < fault.times):
                fault.hits += 1
                return fault
        return None

    # --- inspection ---------------------------------------------------------------------
    def downloads_of(self, path: str) -> list[Recorded]:
        """GET requests that fetched the bytes of a repo file (either hub's download route)."""
        out = []
        for r in self.requests:
            if r.method != "GET":
                continue
            if r.query.get("FilePath") == path or r.path.endswith("/" + path) or r.query.get("filename") == path:
                out.append(r)
        return out

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> "FakeHub":
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake hub did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        for fault in self.faults:
            fault.release()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- HTTP ---------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI()
        hub = self

        @app.middleware("http")
        async def record(request: Request, call_next):
            entry = Recorded(request.method, request.url.path, dict(request.query_params),
                             request.headers.get("range"))
            hub.requests.append(entry)
            response = await call_next(request)
            entry.status = response.status_code
            return response

        # ---------------- Hugging Face ----------------
        @app.get("/api/models")
        def hf_search(search: str = "", limit: int = 20):
            found = [r.repo_id for r in hub.repos.values() if search.lower() in r.repo_id.lower()][:limit]
            return [{"_id": _oid(rid), "id": rid, "modelId": rid, "likes": 0, "downloads": 0, "tags": []}
                    for rid in found]

        @app.get("/api/models/{org}/{name}")
        def hf_info(org: str, name: str, request: Request):
            return hub._hf_info(f"{org}/{name}", None, request)

        @app.get("/api/models/{org}/{name}/revision/{revision:path}")
        def hf_info_revision(org: str, name: str, revision: str, request: Request):
            return hub._hf_info(f"{org}/{name}", revision, request)

        @app.get("/api/models/{org}/{name}/tree/{rest:path}")
        def hf_tree(org: str, name: str, rest: str, request: Request, recursive: bool = False):
            repo, error = hub._hf_lookup(f"{org}/{name}", rest.split("/", 1)[0], request)
            if error:
                return error
            prefix = rest.split("/", 1)[1].strip("/") + "/" if "/" in rest.strip("/") else ""
            entries = []
            for d in repo.directories():
                if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                    entries.append({"type": "directory", "oid": _oid(d), "size": 0, "path": d})
            for path, f in repo.files.items():
                if path.startswith(prefix) and (recursive or "/" not in path[len(prefix):]):
                    entry = {"type": "file", "oid": f.git_oid, "size": f.size, "path": path}
                    if f.lfs:
                        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                    entries.append(entry)
            return entries

        @app.api_route("/{org}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        def hf_resolve(org: str, name: str, revision: str, path: str, request: Request):
            repo, error = hub._hf_lookup(f"{org}/{name}", revision, request)
            if error:
                return error
            f = repo.files.get(path)
            if f is None:
                return _hf_error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"")
            headers = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
            if f.lfs:
                # Like the real hub: LFS content lives on a CDN; the redirect carries its sha256 and size.
                # Another origin (localhost vs 127.0.0.1), as a CDN is: the library must not follow it on HEAD.
                location = f"{hub.cdn_url}/cdn/{repo.repo_id}/{f.sha256}?filename={quote(path)}"
                headers.update({"Location": location, "ETag": f'"{f.git_oid}"',
                                "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
                return Response(status_code=302, headers=headers)
            headers["ETag"] = f'"{f.git_oid}"'
            return hub._serve(f, request, headers)

        @app.api_route("/cdn/{org}/{name}/{sha256}", methods=["GET", "HEAD"])
        def cdn(org: str, name: str, sha256: str, request: Request, filename: str = ""):
            repo = hub.repo(f"{org}/{name}")
            f = repo.files.get(filename) if repo else None
            if f is None or f.sha256 != sha256:
                return Response(status_code=404)
            return hub._serve(f, request, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"})

        # ---------------- ModelScope ----------------
        @app.get("/openapi/v1/models")
        def ms_search(search: str = "", page_number: int = 1, page_size: int = 10):
            found = [r.repo_id for r in hub.repos.values() if search.lower() in r.repo_id.lower()]
            page = found[(page_number - 1) * page_size: page_number * page_size]
            return {"success": True, "data": {
                "models": [_ms_openapi_model(rid) for rid in page],
                "total_count": len(found), "page_number": page_number, "page_size": page_size}}

        @app.get("/openapi/v1/models/{org}/{name}")
        def ms_openapi_model(org: str, name: str):
            repo = hub.repo(f"{org}/{name}")
            if repo is None:
                return JSONResponse({"success": False, "code": "ResourceNotFound",
                                     "message": f"model {org}/{name} not found"}, status_code=404)
            return {"success": True, "data": _ms_openapi_model(repo.repo_id)}

        @app.get("/api/v1/models/{org}/{name}")
        def ms_legacy_model(org: str, name: str):
            repo = hub.repo(f"{org}/{name}")
            if repo is None:
                return _ms_not_found(f"{org}/{name}")
            return _ms_ok({"Id": _oid(repo.repo_id), "Name": repo.repo_id.split("/")[1],
                           "Path": repo.repo_id.split("/")[0], "Visibility": 5})

        @app.get("/api/v1/models/{org}/{name}/revisions")
        def ms_revisions(org: str, name: str):
            repo = hub.repo(f"{org}/{name}")
            if repo is None:
                return _ms_not_found(f"{org}/{name}")
            return _ms_ok({"RevisionMap": {
                "Branches": [{"Revision": MS_DEFAULT_REVISION, "CommitId": repo.commit}],
                "Tags": [{"Revision": t, "CommitId": repo.commit} for t in repo.tags]}})

        @app.get("/api/v1/models/{org}/{name}/repo/files")
        def ms_files(org: str, name: str, Revision: str = MS_DEFAULT_REVISION, Recursive: str = "False",
                     Root: str = ""):
            repo = hub.repo(f"{org}/{name}")
            if repo is None:
                return _ms_not_found(f"{org}/{name}")
            if not repo.knows_revision(Revision):
                return JSONResponse({"Code": 10010205002, "Message": f"revision {Revision} not found",
                                     "RequestId": _oid(Revision), "Success": False}, status_code=404)
            recursive = Recursive.lower() == "true"
            prefix = Root.strip("/") + "/" if Root.strip("/") else ""
            files = []
            for d in repo.directories():
                if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                    files.append({"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0,
                                  "Revision": repo.commit})
            for path, f in repo.files.items():
                if path.startswith(prefix) and (recursive or "/" not in path[len(prefix):]):
                    files.append({"Name": path.rsplit("/", 1)[-1], "Path": path, "Type": "blob", "Size": f.size,
                                  "Sha256": f.sha256, "IsLFS": f.lfs, "Mode": "100644", "Revision": repo.commit,
                                  "CommitId": repo.commit, "CommitMessage": "upload", "CommittedDate": 1700000000})
            return _ms_ok({"Files": files})

        @app.get("/api/v1/models/{org}/{name}/repo")
        def ms_file(org: str, name: str, request: Request, FilePath: str = "", Revision: str = MS_DEFAULT_REVISION):
            repo = hub.repo(f"{org}/{name}")
            if repo is None:
                return _ms_not_found(f"{org}/{name}")
            f = repo.files.get(FilePath)
            if f is None or not repo.knows_revision(Revision):
                return JSONResponse({"Code": 10010205003, "Message": f"file {FilePath} not found",
                                     "Success": False}, status_code=404)
            return hub._serve(f, request, {"Accept-Ranges": "bytes"})

        # ---------------- a hostile hub or mirror ----------------
        @app.api_route("/{rest:path}", methods=["GET", "HEAD"])
        def hf_resolve_folded(rest: str, request: Request):
            """A listed name such as `../../x` reaches the hub as a URL whose dot segments the client's URL
            library folded away (…/resolve/main/../../x -> /x); a hostile hub answers it all the same."""
            for repo in hub.repos.values():
                for path, f in repo.files.items():
                    for revision in (repo.commit, HF_DEFAULT_REVISION):
                        if posixpath.normpath(f"/{repo.repo_id}/resolve/{revision}/{path}") == "/" + rest:
                            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{f.git_oid}"',
                                       "Accept-Ranges": "bytes"}
                            return hub._serve(f, request, headers)
            return JSONResponse({"detail": "Not Found"}, status_code=404)

        return app

    def _hf_lookup(self, repo_id: str, revision: str | None, request: Request):
        repo = self.repo(repo_id)
        if repo is None:
            # Anonymous callers get 401 for a missing repo: the hub will not say whether a private one exists.
            status = 404 if request.headers.get("authorization") else 401
            return None, _hf_error(status, "RepoNotFound", "Repository not found")
        if not repo.knows_revision(revision):
            return None, _hf_error(404, "RevisionNotFound", "Invalid rev id: " + str(revision))
        return repo, None

    def _hf_info(self, repo_id: str, revision: str | None, request: Request):
        repo, error = self._hf_lookup(repo_id, revision, request)
        if error:
            return error
        blobs = request.query_params.get("blobs", "").lower() == "true"
        siblings = []
        for path, f in repo.files.items():
            sibling = {"rfilename": path}
            if blobs:
                sibling.update({"size": f.size, "blobId": f.git_oid})
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(sibling)
        return {"_id": _oid(repo.repo_id), "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                "private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
                "siblings": siblings}

    def _serve(self, f: HubFile, request: Request, headers: dict[str, str]) -> Response:
        size = f.size
        start, end, status = 0, size - 1, 200
        range_header = request.headers.get("range")
        if range_header and range_header.startswith("bytes="):
            first, _, last = range_header[len("bytes="):].split(",")[0].partition("-")
            start = int(first) if first else 0
            end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        headers = {**headers, "Content-Length": str(end - start + 1)}
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        fault = self._take_fault(f.path)
        return StreamingResponse(self._body(f, start, end, fault), status_code=status, headers=headers,
                                 media_type="application/octet-stream")

    async def _body(self, f: HubFile, start: int, end: int, fault: Fault | None):
        sent = 0
        with f.source.open("rb") as fh:
            fh.seek(start)
            position = start
            while position <= end:
                chunk = fh.read(min(CHUNK, end - position + 1))
                if not chunk:
                    break
                if fault is not None and fault.kind == "corrupt" and position <= fault.after < position + len(chunk):
                    i = fault.after - position
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                if fault is not None and fault.kind in ("drop", "stall") and sent + len(chunk) >= fault.after:
                    yield chunk[: fault.after - sent]
                    await asyncio.sleep(0.05)  # let the bytes leave before the connection goes
                    fault.reached.set()
                    if fault.kind == "stall":
                        while not fault.released.is_set():
                            await asyncio.sleep(0.05)
                    raise ConnectionAbortedError(f"fake hub: dropped {f.path} after {fault.after} bytes")
                yield chunk
                sent += len(chunk)
                position += len(chunk)
                await asyncio.sleep(0)


def _hf_error(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status,
                        headers={"X-Error-Code": code, "X-Error-Message": message})


def _ms_ok(data) -> dict:
    return {"Code": 200, "Data": data, "Message": "success", "RequestId": _oid(str(time.time())), "Success": True}


def _ms_not_found(repo_id: str) -> JSONResponse:
    return JSONResponse({"Code": 10010205001, "Message": f"model {repo_id} not found",
                         "RequestId": _oid(repo_id), "Success": False}, status_code=404)


def _ms_openapi_model(repo_id: str) -> dict:
    owner, name = repo_id.split("/", 1)
    return {"id": repo_id, "owner": owner, "name": name, "display_name": name, "private": False, "downloads": 0}


def _oid(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:24]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
