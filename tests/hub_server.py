"""A local stand-in for the Hugging Face Hub's file API, for tests that run the unmodified huggingface_hub client
against it (HF_ENDPOINT=`FakeHub.url`).

It serves model repos from memory, `{repo_id: {commit_sha: {path: bytes}}}` with branch refs
`{repo_id: {"main": commit_sha}}`, and implements what huggingface_hub 2.4 calls for `HfApi.model_info` and
`snapshot_download` / `hf_hub_download`:

- `GET /api/models/{repo_id}[/revision/{rev}]`: model info JSON (`id`, `modelId`, `sha`, `private`, `siblings`
  [{`rfilename`}]);
- `GET /api/models/{repo_id}/tree/{rev}[/{path}]?recursive=...`: the tree listing snapshot_download reads
  (`type`, `path`, `oid` (git blob sha1), `size`, plus `lfs` {`oid` (sha256), `size`, `pointerSize`} for LFS
  files; directories as `type: directory`), one page (no `Link` header);
- `HEAD|GET /{repo_id}/resolve/{rev}/{path}`: a regular file answers 200 with `X-Repo-Commit`, a quoted
  `ETag` (git blob sha1), `Content-Length` and the bytes; an LFS file (LFS_SUFFIXES) answers 302 like the
  Hub does, with `X-Repo-Commit`, `X-Linked-Etag` (quoted sha256), `X-Linked-Size` and a `Location` on a
  second listener (`FakeHub.cdn_url`, another origin, as the Hub's CDN is), which serves
  `GET|HEAD /lfs/{repo_id}/{sha256}/{file name}` (with `Range: bytes=N-` support);
- errors as the Hub sends them: 404 with `X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`,
  an `X-Error-Message` and a JSON body `{"error": ...}`.

Test knobs: `fail(path_contains, times=1, status=503, method=None)` makes the next `times` requests whose path
contains `path_contains` (None: every later one) answer `status`; `requests` records every request as
`Request(method, path, status, auth)` (path without the query string; `auth`: an Authorization header was
sent), for both listeners, in arrival order.
"""
import hashlib
import json
import threading
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".h5", ".msgpack", ".onnx")
Request = namedtuple("Request", "method path status auth")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (the Hub's ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class FakeHub:
    """Two threaded HTTP listeners on 127.0.0.1 (the Hub API and its "CDN"), started by `start()` (or `with`)."""

    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]], refs: dict[str, dict[str, str]] | None = None):
        self.repos = repos
        self.refs = refs or {}
        self.requests: list[Request] = []
        self._faults: list[dict] = []
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.url = self.cdn_url = ""  # set by start(): the endpoint for HF_ENDPOINT, the CDN's origin (kept after stop)
        self._blobs = {hashlib.sha256(data).hexdigest(): data
                       for commits in repos.values() for files in commits.values() for data in files.values()}

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        for role in ("hub", "cdn"):
            handler = type(f"{role.title()}Handler", (_Handler,), {"hub": self, "role": role})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                             name=f"fake-hub-{role}").start()
            self._servers.append(server)
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ test knobs
    def fail(self, path_contains: str, times: int | None = 1, status: int = 503, method: str | None = None) -> None:
        """The next `times` requests (None: all) whose path contains `path_contains` (and of `method`, if given)
        answer `status`."""
        with self._lock:
            self._faults.append({"path": path_contains, "left": times, "status": status, "method": method})

    def _take_fault(self, method: str, path: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault["path"] in path and fault["method"] in (None, method) and fault["left"] != 0:
                    if fault["left"] is not None:
                        fault["left"] -= 1
                    return fault["status"]
        return None

    def _record(self, method: str, path: str, status: int, auth: bool) -> None:
        with self._lock:
            self.requests.append(Request(method, path, status, auth))

    # ------------------------------------------------------------------------------------------ lookups
    def resolve(self, repo_id: str, revision: str) -> tuple[str | None, str | None]:
        """(commit, None) or (None, error code) for a repo and a branch name or commit."""
        if repo_id not in self.repos:
            return None, "RepoNotFound"
        commit = self.refs.get(repo_id, {}).get(revision, revision)
        return (commit, None) if commit in self.repos[repo_id] else (None, "RevisionNotFound")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length
    hub: FakeHub
    role: str

    def log_message(self, format, *args):  # quiet: the test reads `FakeHub.requests`
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    # ------------------------------------------------------------------------------------------ plumbing
    def _dispatch(self, method: str) -> None:
        raw, query = urlsplit(self.path).path, urlsplit(self.path).query
        path = unquote(raw)
        status = self.hub._take_fault(method, path)
        if status is not None:
            self._send(method, status, _json({"error": f"injected {status}"}), {"Content-Type": "application/json"})
        elif self.role == "cdn":
            status = self._cdn(method, path)
        elif path.startswith("/api/models/"):
            status = self._api(method, raw[len("/api/models/"):], query)
        elif "/resolve/" in raw:
            status = self._resolve(method, raw)
        else:
            status = self._send(method, 404, _json({"error": "Not Found"}), {"Content-Type": "application/json"})
        self.hub._record(method, path, status, "authorization" in {k.lower() for k in self.headers})

    def _send(self, method: str, status: int, body: bytes = b"", headers: dict | None = None) -> int:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)
        return status

    def _error(self, method: str, code: str, message: str, extra: dict | None = None) -> int:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json",
                   **(extra or {})}
        return self._send(method, 404, _json({"error": message}), headers)

    # ------------------------------------------------------------------------------------------ endpoints
    def _api(self, method: str, rest: str, query: str) -> int:
        """/api/models/{repo_id}[/revision/{rev}] and /api/models/{repo_id}/tree/{rev}[/{path}] (`rest`: the
        raw path after /api/models/, its parts still percent-encoded)."""
        kind, repo_id, revision, sub = "info", rest.rstrip("/"), "main", ""
        for marker in ("/revision/", "/tree/"):
            if marker in rest:
                repo_id, tail = rest.split(marker, 1)
                kind = marker.strip("/")
                revision, _, sub = tail.partition("/")
                break
        repo_id, revision, sub = unquote(repo_id), unquote(revision), unquote(sub)
        commit, refused = self._commit(method, repo_id, revision)
        if commit is None:
            return refused
        files = self.hub.repos[repo_id][commit]
        if kind in ("info", "revision"):
            info = {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                    "sha": commit, "private": False, "gated": False, "disabled": False, "tags": [],
                    "lastModified": "2024-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": p} for p in sorted(files)]}
            return self._send(method, 200, _json(info), {"Content-Type": "application/json"})
        return self._tree(method, files, sub.strip("/"), "recursive=true" in query.lower())

    def _commit(self, method: str, repo_id: str, revision: str) -> tuple[str | None, int | None]:
        """(commit of repo_id@revision, None), or (None, status of the 404 sent for an unknown repo or revision)."""
        commit, error = self.hub.resolve(repo_id, revision)
        if error == "RepoNotFound":
            return None, self._error(method, error, "Repository not found")
        if error:
            return None, self._error(method, error, f"Invalid rev id: {revision}")
        return commit, None

    def _tree(self, method: str, files: dict[str, bytes], sub: str, recursive: bool) -> int:
        prefix = f"{sub}/" if sub else ""
        inside = sorted(p for p in files if p.startswith(prefix))
        if sub and not inside:
            return self._error(method, "EntryNotFound", f"{sub} does not exist on this revision")
        entries, folders = [], set()
        for p in inside:
            rel = p[len(prefix):]
            parts = rel.split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": git_blob_sha1(folder.encode()), "size": 0,
                                    "path": folder})
            if len(parts) > 1 and not recursive:
                continue
            data = files[p]
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p}
            if is_lfs(p):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return self._send(method, 200, _json(entries), {"Content-Type": "application/json"})

    def _resolve(self, method: str, path: str) -> int:
        """/{repo_id}/resolve/{rev}/{path}: a regular file's bytes, or a redirect to the CDN for an LFS file."""
        repo_id, tail = path.lstrip("/").split("/resolve/", 1)
        revision, _, filename = tail.partition("/")
        repo_id, revision, filename = unquote(repo_id), unquote(revision), unquote(filename)
        commit, refused = self._commit(method, repo_id, revision)
        if commit is None:
            return refused
        files = self.hub.repos[repo_id][commit]
        if filename not in files:
            return self._error(method, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        data = files[filename]
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if is_lfs(filename):
            sha256 = hashlib.sha256(data).hexdigest()
            location = f"{self.hub.cdn_url}/lfs/{repo_id}/{sha256}/{quote(filename.rsplit('/', 1)[-1])}"
            headers.update({"ETag": f'"{git_blob_sha1(data)}"', "X-Linked-Etag": f'"{sha256}"',
                            "X-Linked-Size": str(len(data)), "Location": location})
            return self._send(method, 302, b"", headers)
        headers.update({"ETag": f'"{git_blob_sha1(data)}"', "Content-Type": "application/octet-stream"})
        return self._send(method, 200, data, headers)

    def _cdn(self, method: str, path: str) -> int:
        """/lfs/{repo_id}/{sha256}/{name}: content-addressed LFS bytes (Range: bytes=N- honoured)."""
        parts = path.strip("/").split("/")
        data = self.hub._blobs.get(parts[-2]) if len(parts) >= 3 and parts[0] == "lfs" else None
        if data is None:
            return self._send(method, 404, b"NoSuchKey", {"Content-Type": "text/plain"})
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Content-Type": "application/octet-stream",
                   "Accept-Ranges": "bytes"}
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and wanted[6:].split("-")[0].isdigit():
            start = int(wanted[6:].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(method, 206, data[start:], headers)
        return self._send(method, 200, data, headers)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()
