"""The loopback test servers themselves (tests/remote/servers.py): the HTTP server honours
Range like nginx, its knobs do what they say, and the fault proxy cuts, fails and counts."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Callable

import pytest

from .servers import FaultProxy, HTTPFileServer, NginxServer

pytestmark = pytest.mark.network

DATA = bytes(range(256)) * 1024  # 256 KiB


def _get(
    url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(method, u.path or "/", headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        conn.close()


def _get_partial(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A GET that tolerates a cut connection: (status, the body bytes that arrived)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", u.path, headers=headers or {})
        r = conn.getresponse()
        got = b""
        try:
            while chunk := r.read(8192):
                got += chunk
        except (http.client.IncompleteRead, ConnectionError) as exc:
            got += getattr(exc, "partial", b"")
        return r.status, got
    finally:
        conn.close()


@pytest.fixture
def served(http_server: HTTPFileServer) -> HTTPFileServer:
    http_server.put("run/a.bin", DATA)
    http_server.put("run/step-1/manifest.json", b"{}")
    http_server.put("run/.hidden", b"x")
    return http_server


def test_whole_file_with_validators(served: HTTPFileServer) -> None:
    status, h, body = _get(served.url_for("run/a.bin"))
    assert status == 200 and body == DATA
    assert h["etag"].startswith('"') and h["last-modified"].endswith("GMT")
    assert h["accept-ranges"] == "bytes" and int(h["content-length"]) == len(DATA)
    status, h2, body = _get(served.url_for("run/a.bin"), method="HEAD")
    assert status == 200 and body == b"" and h2["etag"] == h["etag"]
    assert int(h2["content-length"]) == len(DATA)
    assert _get(served.url_for("run/missing"))[0] == 404
    assert _get(served.url + "/run/../../etc/passwd")[0] == 404


def test_ranges_and_416(served: HTTPFileServer) -> None:
    url = served.url_for("run/a.bin")
    status, h, body = _get(url, {"Range": "bytes=10-19"})
    assert (
        status == 206 and body == DATA[10:20] and h["content-range"] == f"bytes 10-19/{len(DATA)}"
    )
    status, h, body = _get(url, {"Range": "bytes=1000-"})
    assert status == 206 and body == DATA[1000:]
    status, h, body = _get(url, {"Range": "bytes=-5"})
    assert status == 206 and body == DATA[-5:]
    status, h, body = _get(url, {"Range": f"bytes=100-{10 * len(DATA)}"})  # clipped to the end
    assert status == 206 and body == DATA[100:]
    status, h, _ = _get(url, {"Range": f"bytes={len(DATA)}-"})
    assert status == 416 and h["content-range"] == f"bytes */{len(DATA)}"


def test_if_range_and_if_match(served: HTTPFileServer) -> None:
    url = served.url_for("run/a.bin")
    etag = _get(url, method="HEAD")[1]["etag"]
    lm = _get(url, method="HEAD")[1]["last-modified"]
    assert _get(url, {"Range": "bytes=0-9", "If-Range": etag})[0] == 206
    assert _get(url, {"Range": "bytes=0-9", "If-Range": lm})[0] == 206
    status, _, body = _get(url, {"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert status == 200 and body == DATA  # the validator failed: the whole (new) file
    assert _get(url, {"If-Match": etag})[0] == 200
    assert _get(url, {"If-Match": '"stale"', "Range": "bytes=0-9"})[0] == 412
    assert _get(url, {"If-None-Match": etag})[0] == 304


def test_ignore_range_and_html_knobs(served: HTTPFileServer) -> None:
    url = served.url_for("run/a.bin")
    served.ignore_range = True
    status, _, body = _get(url, {"Range": "bytes=10-19"})
    assert status == 200 and body == DATA
    served.ignore_range = False
    served.html_for.add("run/a.bin")
    status, h, body = _get(url)
    assert (
        status == 200
        and h["content-type"].startswith("text/html")
        and body.startswith(b"<!DOCTYPE html>")
    )


def test_listing_json_and_html(served: HTTPFileServer) -> None:
    status, h, _ = _get(served.url + "/run")
    assert status == 301 and h["location"] == "/run/"
    status, h, body = _get(served.url + "/run/")
    assert status == 200 and h["content-type"] == "application/json"
    entries = {e["name"]: e for e in json.loads(body)}
    assert set(entries) == {"a.bin", "step-1"}  # dot files left out, as nginx does
    assert entries["a.bin"] == {"name": "a.bin", "type": "file", "size": len(DATA),
                                "mtime": entries["a.bin"]["mtime"]}  # fmt: skip
    assert entries["step-1"]["type"] == "directory" and "size" not in entries["step-1"]
    served.listing = "html"
    status, h, body = _get(served.url + "/run/")
    assert status == 200 and h["content-type"] == "text/html"
    assert b'<a href="a.bin">a.bin</a>' in body and b'<a href="step-1/">step-1/</a>' in body


def test_change_after_n_bytes_changes_the_etag(served: HTTPFileServer) -> None:
    url = served.url_for("run/a.bin")
    etag = _get(url, method="HEAD")[1]["etag"]
    served.change_after("run/a.bin", 100_000)
    status, _, body = _get(url)
    assert status == 200 and body == DATA  # replaced atomically: this response is consistent
    status, h, body = _get(url, {"Range": "bytes=100000-", "If-Range": etag})
    assert status == 200 and h["etag"] != etag and body == bytes(b ^ 0xFF for b in DATA)
    assert served.sent["run/a.bin"] == 2 * len(DATA)


def test_change_in_place_tears_the_response(served: HTTPFileServer) -> None:
    served.change_after("run/a.bin", 100_000, inplace=True)
    _, _, body = _get(served.url_for("run/a.bin"))
    assert body[:100_000] == DATA[:100_000] and body[100_000:] != DATA[100_000:]


def test_cut_after(served: HTTPFileServer) -> None:
    url = served.url_for("run/a.bin")
    served.cut_after("run/a.bin", 50_000, times=1)
    status, got = _get_partial(url)
    assert status == 200 and got == DATA[:50_000]
    assert _get(url)[2] == DATA  # only once


def test_proxy_forwards_and_counts(
    served: HTTPFileServer, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    proxy = fault_proxy(served.url)
    status, _, body = _get(proxy.url + "/run/a.bin")
    assert status == 200 and body == DATA
    assert len(DATA) < proxy.bytes_down < len(DATA) + 1000  # the body and one response head
    assert 0 < proxy.bytes_up < 1000 and proxy.requests == 1 and proxy.connections == 1
    proxy.reset_counts()
    assert proxy.bytes_down == 0


def test_proxy_cuts_then_recovers(
    served: HTTPFileServer, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    proxy = fault_proxy(served.url)
    proxy.cut_after(30_000, times=2)
    for _ in range(2):
        status, got = _get_partial(proxy.url + "/run/a.bin")
        assert len(got) < 30_000  # the cut counts the response head too
    assert proxy.cuts == 2
    assert _get(proxy.url + "/run/a.bin")[2] == DATA


def test_proxy_fails_the_next_requests(
    served: HTTPFileServer, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    proxy = fault_proxy(served.url)
    proxy.fail_next(2, status=503)
    assert _get(proxy.url + "/run/a.bin")[0] == 503
    assert _get(proxy.url + "/run/a.bin", method="HEAD")[0] == 503
    assert _get(proxy.url + "/run/a.bin")[0] == 200
    assert len(served.requests) == 1  # upstream saw only the one that went through
    proxy.fail_next(1, status=500)
    u = urllib.parse.urlsplit(proxy.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("PUT", "/x", body=b"y" * 100_000)  # a body is read before the canned answer
    assert conn.getresponse().status == 500
    conn.close()


def test_proxy_delay(served: HTTPFileServer, fault_proxy: Callable[[str], FaultProxy]) -> None:
    import time

    proxy = fault_proxy(served.url)
    proxy.delay = 0.2
    t = time.monotonic()
    assert _get(proxy.url + "/run/step-1/manifest.json")[2] == b"{}"
    assert time.monotonic() - t >= 0.2


def test_proxy_in_front_of_keep_alive_nginx(
    nginx_server: NginxServer, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    (nginx_server.root / "a.bin").write_bytes(DATA)
    proxy = fault_proxy(nginx_server.url)
    u = urllib.parse.urlsplit(proxy.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    for rng in ("bytes=0-9", "bytes=10-19"):  # two requests on one kept-alive connection
        conn.request("GET", "/a.bin", headers={"Range": rng})
        r = conn.getresponse()
        assert r.status == 206 and r.read() == DATA[int(rng[6:].split("-")[0]) :][:10]
    proxy.fail_next(1, status=503)
    conn.request("GET", "/a.bin")
    assert conn.getresponse().status == 503
    conn.close()
    assert proxy.requests == 3 and proxy.connections == 1


def test_nginx_serves_ranges_and_json_listings(nginx_server: NginxServer) -> None:
    (nginx_server.root / "run").mkdir()
    (nginx_server.root / "run" / "a.bin").write_bytes(DATA)
    status, h, body = _get(nginx_server.url_for("run/a.bin"), {"Range": "bytes=10-19"})
    assert status == 206 and body == DATA[10:20] and "etag" in h
    status, _, body = _get(nginx_server.url + "/run/")
    assert status == 200 and json.loads(body)[0]["name"] == "a.bin"
    assert _get(nginx_server.url_for("run/a.bin"), {"Range": f"bytes={len(DATA)}-"})[0] == 416


def test_proxy_refuses_a_bad_upstream() -> None:
    with pytest.raises(ValueError):
        FaultProxy("nowhere")


def test_s3_through_the_proxy(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    import os

    import obstore
    from obstore.store import S3Store

    proxy = fault_proxy(os.environ["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    bucket = urllib.parse.urlsplit(s3_url).hostname
    store = S3Store(bucket, client_options={"allow_http": True})
    obstore.put(store, "k", DATA)
    assert proxy.bytes_up > len(DATA)
    proxy.fail_next(2, status=503)  # the client retries
    assert bytes(obstore.get(store, "k").bytes()) == DATA
    assert proxy.requests >= 4
    got = obstore.get_range(store, "k", start=10, end=20)
    assert bytes(got) == DATA[10:20]


def test_obstore_http_reads_ranges(served: HTTPFileServer) -> None:
    import obstore
    from obstore.store import HTTPStore

    store = HTTPStore.from_url(served.url + "/run", client_options={"allow_http": True})
    assert bytes(obstore.get_range(store, "a.bin", start=5, end=15)) == DATA[5:15]
    assert any(r.headers.get("range") == "bytes=5-14" for r in served.requests)
