"""Real servers on loopback for the remote tests (issue 11): a static HTTP server that honours
``Range``, nginx when it is installed, and a fault-injecting TCP proxy. The fixtures in
``tests/remote/conftest.py`` start them; this module holds the classes.

HTTP server (fixture ``http_server``, class :class:`HTTPFileServer`)
--------------------------------------------------------------------
werkzeug serving the folder ``http_server.root`` (a fresh temp folder per test) at
``http_server.url`` (``http://127.0.0.1:PORT``, no trailing slash)::

    (http_server.root / "run" / "a.bin").write_bytes(data)   # or http_server.put("run/a.bin", data)
    url = http_server.url_for("run/a.bin")                    # http://127.0.0.1:PORT/run/a.bin

What it does, like nginx's static file module:

- ``GET`` / ``HEAD``; ``ETag`` (``"<mtime_ns hex>-<size hex>"``) and ``Last-Modified`` on every
  file; ``Accept-Ranges: bytes``.
- ``Range: bytes=a-b`` / ``a-`` / ``-n`` (one range) -> 206 with ``Content-Range``; a range that
  starts at or past the end -> 416 with ``Content-Range: bytes */SIZE``; several ranges -> 200 with
  the whole file (allowed: a server may ignore ``Range``).
- ``If-Range`` (an ETag or an HTTP date): does not match -> 200 with the whole file.
- ``If-Match`` / ``If-Unmodified-Since`` -> 412 when they fail; ``If-None-Match`` /
  ``If-Modified-Since`` -> 304.
- A folder: ``/dir`` -> 301 to ``/dir/``; ``/dir/`` -> its listing, as nginx's
  ``autoindex_format json`` (``[{"name": "a.bin", "type": "file", "mtime": "<HTTP date>",
  "size": 3}, {"name": "sub", "type": "directory", "mtime": "..."}]``, folders without ``size``)
  or, with ``http_server.listing = "html"``, as nginx's HTML page of links (``<a href="sub/">``).
  Names starting with ``.`` are left out of listings (as nginx does) but served when asked for.
- 404 for anything missing; ``..`` never leaves the root.

Knobs (per test; every test gets a fresh server):

- ``http_server.listing = "json" | "html"``
- ``http_server.ignore_range = True``: answer every ``Range`` with 200 and the whole file.
- ``http_server.html_for.add("run/a.bin")``: that path answers 200 ``text/html`` (a login or error
  page) instead of its bytes.
- ``http_server.after_bytes("run/a.bin", n, fn)``: call ``fn()`` once, after ``n`` body bytes of that
  path have been sent (counted over all its responses), in the serving thread, mid-response.
- ``http_server.change_after("run/a.bin", n, data)``: a file changed mid-download: after ``n`` bytes
  were sent, the file is replaced by ``data`` (default: the same size, every byte flipped) with
  a new mtime, so its ETag and Last-Modified change. ``inplace=False`` (default) replaces it
  atomically, as a deploy does: the response in flight finishes with the old bytes, the next
  request sees the new file. ``inplace=True`` overwrites it in place: the response in flight goes
  on with the new bytes (a torn download only a hash can catch).
- ``http_server.cut_after("run/a.bin", n, times=1)``: the next ``times`` responses of that path
  are cut (connection closed) after ``n`` body bytes (``None``: every response).
- Records: ``http_server.requests`` (a list of :class:`Request`: method, path, headers, status)
  and ``http_server.sent`` (body bytes sent per path).

nginx (fixture ``nginx_server``, class :class:`NginxServer`)
------------------------------------------------------------
nginx 1.x serving ``nginx_server.root`` with ``autoindex on; autoindex_format json;`` at
``nginx_server.url``. The fixture skips the test when ``nginx`` is not on ``PATH`` (CI may not
have it). No knobs: put a :class:`FaultProxy` in front for faults.

Fault proxy (fixture ``fault_proxy``, class :class:`FaultProxy`)
----------------------------------------------------------------
A threaded TCP proxy that understands just enough HTTP/1.1 (request heads, ``Content-Length`` and
chunked request bodies) to count requests. The fixture is a factory::

    proxy = fault_proxy(http_server.url)      # or fault_proxy(s3_server.endpoint)
    url = proxy.url                           # http://127.0.0.1:PROXYPORT: use instead of upstream

Knobs (thread-safe; set them any time):

- ``proxy.cut_after(n, times=1)``: the next ``times`` connections that carry response bytes are
  closed after ``n`` response bytes each (counted from when the connection picks the fault up;
  ``times=None``: every connection from now on). ``proxy.cuts`` counts the cuts done.
- ``proxy.fail_next(k, status=503)``: the next ``k`` requests are answered by the proxy itself with
  that status (a small canned response, ``Connection: close``); upstream never sees them.
- ``proxy.delay = seconds``: a pause before each chunk forwarded from upstream (slow server).
- Counters: ``proxy.bytes_up`` (client -> upstream), ``proxy.bytes_down`` (upstream -> client,
  canned responses not counted), ``proxy.requests`` (requests seen, failed ones included),
  ``proxy.connections``; ``proxy.reset_counts()``. ``proxy.clear()`` drops every armed fault.

S3 through the proxy: set ``AWS_ENDPOINT_URL`` to ``proxy.url`` (``S3Server.env()`` then
``monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)``).
"""

from __future__ import annotations

import email.utils
import errno
import html
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FaultProxy",
    "HTTPFileServer",
    "NginxServer",
    "Request",
    "free_port",
    "http_date",
]

_CHUNK = 64 * 1024


def http_date(ts: float) -> str:
    """An HTTP date (``Sun, 29 Nov 2026 19:49:56 GMT``) for a POSIX timestamp."""
    return email.utils.formatdate(ts, usegmt=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode} before listening"
                ) from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# ---- HTTP file server --------------------------------------------------------------------------
@dataclass
class Request:
    method: str
    path: str  # decoded, relative to the root, no leading "/" (a folder ends with "/")
    headers: dict[str, str]  # names lower-case
    status: int = 0


@dataclass
class _Trigger:
    after: int
    fn: Callable[[], Any]
    fired: bool = False


@dataclass
class _Cut:
    after: int
    times: int | None  # None: every response


@dataclass
class _State:
    listing: str = "json"
    ignore_range: bool = False
    html_for: set[str] = field(default_factory=set)
    triggers: dict[str, list[_Trigger]] = field(default_factory=dict)
    cuts: dict[str, _Cut] = field(default_factory=dict)


class HTTPFileServer:
    """A static file server over ``root`` on 127.0.0.1 (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        from werkzeug.serving import WSGIRequestHandler, make_server

        class _Quiet(WSGIRequestHandler):
            def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002
                pass

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._state = _State()
        self.requests: list[Request] = []
        self.sent: dict[str, int] = {}
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True, request_handler=_Quiet)
        self.port = int(self._server.socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    # -- knobs ----------------------------------------------------------------------------------
    @property
    def listing(self) -> str:
        return self._state.listing

    @listing.setter
    def listing(self, value: str) -> None:
        if value not in ("json", "html"):
            raise ValueError("listing is 'json' or 'html'")
        self._state.listing = value

    @property
    def ignore_range(self) -> bool:
        return self._state.ignore_range

    @ignore_range.setter
    def ignore_range(self, value: bool) -> None:
        self._state.ignore_range = bool(value)

    @property
    def html_for(self) -> set[str]:
        return self._state.html_for

    def after_bytes(self, path: str, n: int, fn: Callable[[], Any]) -> None:
        with self._lock:
            self._state.triggers.setdefault(path.lstrip("/"), []).append(_Trigger(n, fn))

    def change_after(
        self, path: str, n: int, data: bytes | None = None, *, inplace: bool = False
    ) -> None:
        target = self.root / path.lstrip("/")

        def change() -> None:
            old = target.read_bytes()
            new = bytes(b ^ 0xFF for b in old) if data is None else data
            st = target.stat()
            if inplace:
                with open(target, "r+b") as f:
                    f.write(new)
                    f.truncate(len(new))
            else:
                tmp = target.with_name(f".{target.name}.new")
                tmp.write_bytes(new)
                os.replace(tmp, target)
            bump = st.st_mtime_ns + 2_000_000_000  # a new ETag and a new Last-Modified second
            os.utime(target, ns=(bump, bump))

        self.after_bytes(path, n, change)

    def cut_after(self, path: str, n: int, times: int | None = 1) -> None:
        with self._lock:
            self._state.cuts[path.lstrip("/")] = _Cut(n, times)

    def put(self, path: str, data: bytes) -> Path:
        """Write a file under the root (folders made as needed); returns its local path."""
        p = self.root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def url_for(self, path: str) -> str:
        return f"{self.url}/{urllib.parse.quote(path.lstrip('/'))}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- the WSGI app ---------------------------------------------------------------------------
    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        method = environ["REQUEST_METHOD"]
        raw = environ.get("PATH_INFO", "/")
        # werkzeug decodes PATH_INFO as latin-1 bytes; back to the UTF-8 the client sent
        rel = raw.encode("latin-1").decode("utf-8", "replace").lstrip("/")
        headers = {
            k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")
        }
        req = Request(method, rel, headers)
        with self._lock:
            self.requests.append(req)

        def respond(status: int, hdrs: list[tuple[str, str]], body: bytes = b"") -> Iterator[bytes]:
            req.status = status
            if not any(k.lower() == "content-length" for k, _ in hdrs):
                hdrs.append(("Content-Length", str(len(body))))
            start_response(f"{status} {_REASONS.get(status, 'Status')}", hdrs)
            return iter([] if method == "HEAD" else [body])

        if method not in ("GET", "HEAD"):
            return respond(405, [("Allow", "GET, HEAD")])
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if ".." in parts:
            return respond(404, [("Content-Type", "text/plain")], b"not found\n")
        path = self.root.joinpath(*parts)
        if rel.rstrip("/") in self._state.html_for or rel in self._state.html_for:
            page = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please sign in</body></html>\n"
            return respond(200, [("Content-Type", "text/html; charset=utf-8")], page)
        if path.is_dir():
            if rel and not rel.endswith("/"):
                loc = "/" + urllib.parse.quote(rel) + "/"
                return respond(301, [("Location", loc), ("Content-Type", "text/html")])
            return self._listing(path, "/" + rel, respond)
        if not path.is_file():
            return respond(404, [("Content-Type", "text/plain")], b"not found\n")
        return self._file(environ, method, rel, path, req, respond, start_response)

    def _listing(
        self, folder: Path, url_path: str, respond: Callable[..., Iterator[bytes]]
    ) -> Iterator[bytes]:
        entries = []
        for child in sorted(folder.iterdir(), key=lambda c: c.name):
            if child.name.startswith("."):
                continue
            st = child.stat()
            is_dir = child.is_dir()
            e: dict[str, Any] = {"name": child.name, "type": "directory" if is_dir else "file",
                                 "mtime": http_date(st.st_mtime)}  # fmt: skip
            if not is_dir:
                e["size"] = st.st_size
            entries.append(e)
        if self._state.listing == "json":
            body = json.dumps(entries, indent=1).encode()
            return respond(200, [("Content-Type", "application/json")], body)
        title = html.escape(url_path)
        lines = [f"<html>\r\n<head><title>Index of {title}</title></head>\r\n<body>\r\n",
                 f"<h1>Index of {title}</h1><hr><pre><a href=\"../\">../</a>\r\n"]  # fmt: skip
        for e in entries:
            name = e["name"] + ("/" if e["type"] == "directory" else "")
            href = urllib.parse.quote(name)
            size = "-" if e["type"] == "directory" else str(e["size"])
            lines.append(f'<a href="{href}">{html.escape(name)}</a>    {e["mtime"]}  {size}\r\n')
        lines.append("</pre><hr></body>\r\n</html>\r\n")
        return respond(200, [("Content-Type", "text/html")], "".join(lines).encode())

    def _file(
        self, environ: dict[str, Any], method: str, rel: str, path: Path, req: Request,
        respond: Callable[..., Iterator[bytes]], start_response: Callable[..., Any],
    ) -> Iterator[bytes]:  # fmt: skip
        f = open(path, "rb")  # noqa: SIM115 - closed by the body generator
        try:
            st = os.fstat(f.fileno())
            size = st.st_size
            etag = f'"{st.st_mtime_ns:x}-{size:x}"'
            modified = int(st.st_mtime)
            base = [("ETag", etag), ("Last-Modified", http_date(modified)),
                    ("Accept-Ranges", "bytes")]  # fmt: skip
            h = req.headers
            if "if-match" in h and not _etag_matches(h["if-match"], etag):
                f.close()
                return respond(412, base)
            if "if-unmodified-since" in h and not _not_after(h["if-unmodified-since"], modified):
                f.close()
                return respond(412, base)
            if "if-none-match" in h:
                if _etag_matches(h["if-none-match"], etag, weak=True):
                    f.close()
                    return respond(304, base)
            elif "if-modified-since" in h and _not_after(h["if-modified-since"], modified):
                f.close()
                return respond(304, base)
            start, end, status = 0, size, 200  # end exclusive
            rng = h.get("range")
            if rng is not None and not self._state.ignore_range:
                if_range = h.get("if-range")
                if if_range is None or _if_range_ok(if_range, etag, modified):
                    parsed = _parse_range(rng, size)
                    if parsed == "unsatisfiable":
                        f.close()
                        return respond(416, [*base, ("Content-Range", f"bytes */{size}")])
                    if parsed is not None:
                        start, end = parsed
                        status = 206
            hdrs = [*base, ("Content-Type", "application/octet-stream"),
                    ("Content-Length", str(end - start))]  # fmt: skip
            if status == 206:
                hdrs.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
            req.status = status
            start_response(f"{status} {_REASONS[status]}", hdrs)
        except BaseException:
            f.close()
            raise
        if method == "HEAD":
            f.close()
            return iter([])
        return self._body(environ, f, rel, start, end)

    def _body(
        self, environ: dict[str, Any], f: Any, rel: str, start: int, end: int
    ) -> Iterator[bytes]:
        with self._lock:
            cut = self._state.cuts.get(rel)
            cut_at: int | None = None
            if cut is not None and (cut.times is None or cut.times > 0):
                cut_at = cut.after
                if cut.times is not None:
                    cut.times -= 1
        try:
            f.seek(start)
            pos, done = start, 0
            while pos < end:
                want = min(_CHUNK, end - pos)
                with self._lock:  # stop at the next trigger or cut so it fires at its exact byte
                    total = self.sent.get(rel, 0)
                    for t in self._state.triggers.get(rel, []):
                        if not t.fired and t.after > total:
                            want = min(want, t.after - total)
                if cut_at is not None:
                    want = min(want, cut_at - done)
                if cut_at is not None and want <= 0:
                    self._cut(environ)
                chunk = f.read(want)
                if not chunk:
                    break  # the file shrank under us: the client sees a short body
                pos += len(chunk)
                done += len(chunk)
                # Counted before the yield: the server resumes this generator only when it
                # wants the next chunk, and a client that has read the whole body may look at
                # ``sent`` before that (a flaky count under load).
                with self._lock:
                    total = self.sent[rel] = self.sent.get(rel, 0) + len(chunk)
                yield chunk
                fire: list[_Trigger] = []
                with self._lock:
                    for t in self._state.triggers.get(rel, []):
                        if not t.fired and total >= t.after:
                            t.fired = True
                            fire.append(t)
                for t in fire:
                    t.fn()
            if cut_at is not None and done >= cut_at and pos < end:
                self._cut(environ)
        finally:
            f.close()

    @staticmethod
    def _cut(environ: dict[str, Any]) -> None:
        sock = environ.get("werkzeug.socket")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        raise ConnectionResetError(errno.ECONNRESET, "cut by the test server")


_REASONS = {200: "OK", 206: "Partial Content", 301: "Moved Permanently", 304: "Not Modified",
            404: "Not Found", 405: "Method Not Allowed", 412: "Precondition Failed",
            416: "Range Not Satisfiable", 500: "Internal Server Error",
            503: "Service Unavailable"}  # fmt: skip


def _etag_matches(header: str, etag: str, weak: bool = False) -> bool:
    for tag in (t.strip() for t in header.split(",")):
        if tag == "*":
            return True
        if weak:
            tag = tag.removeprefix("W/")
        if tag == etag:
            return True
    return False


def _parse_date(value: str) -> int | None:
    try:
        return int(email.utils.parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _not_after(header: str, modified: int) -> bool:
    """The file was not modified after the header's date."""
    d = _parse_date(header)
    return d is not None and modified <= d


def _if_range_ok(value: str, etag: str, modified: int) -> bool:
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == etag  # a strong comparison; weak tags never match
    d = _parse_date(value)
    return d is not None and d == modified


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(start, end exclusive), "unsatisfiable", or None (ignore: malformed or several ranges)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return "unsatisfiable" if n == 0 else None
            return (max(0, size - n), size) if size else "unsatisfiable"
        a = int(first)
        b = int(last) if last else size - 1
    except ValueError:
        return None
    if a < 0 or (last and b < a):
        return None
    if a >= size:
        return "unsatisfiable"
    return a, min(b, size - 1) + 1


# ---- nginx -------------------------------------------------------------------------------------
class NginxServer:
    """nginx serving ``root`` (autoindex on, JSON listings) on 127.0.0.1; needs ``nginx``."""

    def __init__(self, root: str | os.PathLike[str], workdir: str | os.PathLike[str]) -> None:
        exe = shutil.which("nginx") or (
            "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
        )
        if exe is None:
            raise FileNotFoundError("nginx is not installed")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        # free_port() releases the port before nginx binds it, and under pytest-xdist another
        # worker may take it in between: nginx then exits at once, and a new port is tried.
        for attempt in range(3):
            try:
                self._start(exe, work)
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def _start(self, exe: str, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        user = "user root;\n" if os.geteuid() == 0 else ""
        temps = "".join(
            f"  {d}_temp_path {work / d};\n"
            for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = work / "nginx.conf"
        conf.write_text(
            f"{user}worker_processes 1;\ndaemon off;\npid {work / 'nginx.pid'};\n"
            f"error_log {work / 'error.log'} warn;\n"
            "events { worker_connections 256; }\n"
            "http {\n  access_log off;\n" + temps + "  default_type application/octet-stream;\n"
            f"  server {{\n    listen 127.0.0.1:{self.port};\n    root {self.root};\n"
            "    autoindex on;\n    autoindex_format json;\n  }\n}\n"
        )
        self._proc = subprocess.Popen(
            [exe, "-c", str(conf), "-p", str(work)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            _wait_listening(self.port, proc=self._proc)
        except BaseException:
            self.close()
            raise

    def url_for(self, path: str) -> str:
        return f"{self.url}/{urllib.parse.quote(path.lstrip('/'))}"

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()


# ---- fault proxy -------------------------------------------------------------------------------
class _ConnClosed(Exception):
    pass


class _Reader:
    """Buffered reads from a socket: lines and exact counts (for HTTP request framing)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(_CHUNK)
        if not data:
            raise _ConnClosed
        self.buf += data

    def until(self, sep: bytes, limit: int = 1 << 20) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out, self.buf = self.buf[: i + len(sep)], self.buf[i + len(sep) :]
                return out
            if len(self.buf) > limit:
                raise _ConnClosed
            self._fill()

    def some(self, n: int) -> bytes:
        if not self.buf:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``upstream`` that can cut, delay and fail
    (see the module docstring)."""

    def __init__(self, upstream: str) -> None:
        u = urllib.parse.urlsplit(upstream if "://" in upstream else f"http://{upstream}")
        if u.hostname is None or u.port is None:
            raise ValueError(f"upstream needs a host and a port: {upstream!r}")
        self.upstream = (u.hostname, u.port)
        self._lock = threading.Lock()
        self.delay = 0.0
        self._cut_after: int | None = None
        self._cut_times: int | None = 0
        self._fail: list[int] = []  # statuses of the next failed requests
        self.bytes_up = 0
        self.bytes_down = 0
        self.requests = 0
        self.connections = 0
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        self._socks: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    # -- knobs ----------------------------------------------------------------------------------
    def cut_after(self, n: int, times: int | None = 1) -> None:
        with self._lock:
            self._cut_after, self._cut_times = n, times

    def fail_next(self, k: int = 1, status: int = 503) -> None:
        with self._lock:
            self._fail.extend([status] * k)

    def clear(self) -> None:
        with self._lock:
            self._cut_after, self._cut_times, self._fail = None, 0, []
            self.delay = 0.0

    def reset_counts(self) -> None:
        with self._lock:
            self.bytes_up = self.bytes_down = self.requests = self.connections = self.cuts = 0

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the loop
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _close(s)
        self._thread.join(timeout=5)

    # -- plumbing -------------------------------------------------------------------------------
    def _claim_cut(self) -> int | None:
        with self._lock:
            if self._cut_after is None or self._cut_times == 0:
                return None
            if self._cut_times is not None:
                self._cut_times -= 1
            return self._cut_after

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._socks.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        reader = _Reader(client)
        try:
            head = reader.until(b"\r\n\r\n")
            if self._take_failure(client, reader, head):
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._socks.add(upstream)
            threading.Thread(target=self._pump_down, args=(upstream, client), daemon=True).start()
            while True:
                self._send_up(upstream, head)
                self._forward_body(reader, upstream, head)
                head = reader.until(b"\r\n\r\n")
                if self._take_failure(client, reader, head):
                    return
        except (_ConnClosed, OSError):
            pass
        finally:
            if upstream is not None:
                try:
                    upstream.shutdown(socket.SHUT_WR)  # let the response in flight finish
                except OSError:
                    pass

    def _send_up(self, upstream: socket.socket, data: bytes) -> None:
        with self._lock:  # counted first: a reader that got the reply sees the count
            self.bytes_up += len(data)
        upstream.sendall(data)

    def _take_failure(self, client: socket.socket, reader: _Reader, head: bytes) -> bool:
        with self._lock:
            self.requests += 1
            status = self._fail.pop(0) if self._fail else None
        if status is None:
            return False
        h = _head_fields(head)
        if "100-continue" not in h.get("expect", "").lower():
            try:  # read the body first: closing with unread bytes would reset the connection
                self._forward_body(reader, None, head)
            except (_ConnClosed, OSError):
                pass
        body = f"{status} {_REASONS.get(status, 'Error')} (fault proxy)\n".encode()
        reply = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        try:
            client.sendall(reply)
            client.shutdown(socket.SHUT_WR)
            client.settimeout(1.0)
            while client.recv(_CHUNK):  # until the client closes its side
                pass
        except OSError:
            pass
        _close(client)
        with self._lock:
            self._socks.discard(client)
        return True

    def _forward_body(self, reader: _Reader, upstream: socket.socket | None, head: bytes) -> None:
        def out(data: bytes) -> None:
            if upstream is not None and data:
                self._send_up(upstream, data)

        h = _head_fields(head)
        if "chunked" in h.get("transfer-encoding", "").lower():
            while True:
                line = reader.until(b"\r\n")
                out(line)
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:  # trailers, then an empty line
                    while True:
                        t = reader.until(b"\r\n")
                        out(t)
                        if t == b"\r\n":
                            return
                left = n + 2
                while left:
                    d = reader.some(left)
                    out(d)
                    left -= len(d)
        left = int(h.get("content-length", "0") or 0)
        while left:
            d = reader.some(min(left, _CHUNK))
            out(d)
            left -= len(d)

    def _pump_down(self, upstream: socket.socket, client: socket.socket) -> None:
        cut_at: int | None = None
        claimed = False
        done = 0
        try:
            while True:
                data = upstream.recv(_CHUNK)
                if not data:
                    break
                if not claimed:
                    claimed = True
                    cut_at = self._claim_cut()
                if self.delay:
                    time.sleep(self.delay)
                if cut_at is not None and done + len(data) >= cut_at:
                    data = data[: cut_at - done]
                    with self._lock:
                        self.bytes_down += len(data)
                        self.cuts += 1
                    client.sendall(data)
                    break
                with self._lock:
                    self.bytes_down += len(data)
                client.sendall(data)
                done += len(data)
        except OSError:
            pass
        finally:
            # a cut: both sides closed at once; a normal end: the client sees the server's EOF
            if cut_at is not None:
                try:
                    client.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            _close(client)
            _close(upstream)
            with self._lock:
                self._socks.discard(client)
                self._socks.discard(upstream)


def _head_fields(head: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return fields


def _close(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass
