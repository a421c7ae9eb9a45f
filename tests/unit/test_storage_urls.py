"""URLs of remote stores (storage/urls.py): supported schemes, redaction of every secret a URL
can carry, and obstore's failures as typed savegame errors with actionable messages."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from savegame import errors
from savegame.storage import urls
from savegame.storage.base import ChangedError

obstore = pytest.importorskip("obstore")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("s3://AKIAXYZ:se%2Fcret@bucket/runs/x", "s3://***@bucket/runs/x"),
        ("https://user:pw@host:8080/a/b?token=abc&sig=zz", "https://***@host:8080/a/b?token=***&sig=***"),
        ("s3://b/p?X-Amz-Signature=abc&X-Amz-Credential=AKIA", "s3://b/p?X-Amz-Signature=***&X-Amz-Credential=***"),
        ("az://c/p?sv=2020&sig=SECRET", "az://c/p?sv=***&sig=***"),
        ("gs://bucket/plain/path", "gs://bucket/plain/path"),
        ("s3:///no-bucket", "s3:///no-bucket"),
        ("/a/local/path", "/a/local/path"),
    ],
)  # fmt: skip
def test_redact_hides_every_secret(url: str, shown: str) -> None:
    assert urls.redact(url) == shown


def test_redact_text_hides_urls_inside_library_messages() -> None:
    text = "Error performing GET https://u:pw@h/a?X-Amz-Signature=SECRET in 3ms: 500"
    out = urls.redact_text(text)
    assert "SECRET" not in out and "pw" not in out and "in 3ms: 500" in out


def test_unknown_scheme_lists_the_supported_ones() -> None:
    with pytest.raises(errors.UnsupportedURLError) as info:
        urls.connect("hdfs://namenode/runs/x")
    msg = str(info.value)
    for scheme in ("s3://", "gs://", "az://", "https://", "file://"):
        assert scheme in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, errors.StorageError)


def test_a_url_without_a_bucket_is_refused() -> None:
    with pytest.raises(errors.UnsupportedURLError, match="no bucket"):
        urls.connect("s3:///runs/x")


def test_credentials_in_a_url_are_never_echoed() -> None:
    with pytest.raises(errors.CredentialsError) as info:
        urls.connect("gs://user:topsecret@bucket/x")
    assert "topsecret" not in str(info.value) and "GOOGLE_APPLICATION_CREDENTIALS" in str(
        info.value
    )


def test_http_urls_are_read_only_and_redacted() -> None:
    t = urls.connect("https://user:pw@example.com/runs/x")
    assert t.read_only and t.url == "https://***@example.com/runs/x"


def test_a_token_in_an_http_run_url_is_refused_not_silently_dropped() -> None:
    with pytest.raises(errors.UnsupportedURLError, match="query string") as info:
        urls.connect("https://example.com/runs/x?token=abc")
    assert "abc" not in str(info.value) and "token=***" in str(info.value)


def test_memory_urls_name_one_store_per_process() -> None:
    a, b = urls.connect("memory://same/a"), urls.connect("memory://same/b")
    assert a.store is b.store and (a.prefix, b.prefix) == ("a", "b")


# ---- translate: obstore's errors as typed errors -----------------------------------------------
class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status and S3 error code the test set."""

    status = 403
    code = "AccessDenied"

    def _reply(self) -> None:
        body = (
            f'<?xml version="1.0"?><Error><Code>{self.code}</Code><Message>no</Message></Error>'
        ).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _reply

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Canned]]:
    handler = type("H", (_Canned,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
    }.items():
        monkeypatch.setenv(k, v)
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def _fail(url: str) -> OSError:
    target = urls.connect(url)
    try:
        obstore.get(target.store, "x").bytes()
    except Exception as exc:  # noqa: BLE001 - translating is the point
        return urls.translate(exc, target.url)
    raise AssertionError("the request succeeded")


@pytest.mark.parametrize(
    ("status", "code", "typed", "says"),
    [
        (403, "AccessDenied", errors.AccessDeniedError, "access denied"),
        (403, "InvalidAccessKeyId", errors.CredentialsError, "AWS_ACCESS_KEY_ID"),
        (403, "SignatureDoesNotMatch", errors.CredentialsError, "AWS_SECRET_ACCESS_KEY"),
        (404, "NoSuchBucket", errors.CheckpointNotFoundError, "bucket 'bkt' does not exist"),
        (404, "NoSuchKey", FileNotFoundError, "not found"),
        (412, "PreconditionFailed", ChangedError, "changed"),
    ],
)  # fmt: skip
def test_store_failures_become_typed_errors(
    canned: type[_Canned], status: int, code: str, typed: type[Exception], says: str
) -> None:
    canned.status, canned.code = status, code
    err = _fail("s3://bkt/runs/x")
    assert isinstance(err, typed), (type(err), err)
    assert says in str(err)
    assert "Debug source" not in str(err)


def test_a_typed_error_names_the_redacted_url_only(canned: type[_Canned]) -> None:
    canned.status, canned.code = 403, "AccessDenied"
    err = _fail("s3://AKIAUSER:verysecret@bkt/runs/x")
    assert "verysecret" not in str(err) and "s3://***@bkt/runs/x" in str(err)


def test_an_unreachable_server_says_so() -> None:
    target = urls.connect("http://user:pw@127.0.0.1:9/runs/x")
    try:
        obstore.get(target.store, "a").bytes()
    except Exception as exc:  # noqa: BLE001 - translating is the point
        err = urls.translate(exc, target.url)
    else:
        raise AssertionError("port 9 answered")
    assert isinstance(err, ConnectionRefusedError) and "cannot reach the server" in str(err)
    assert "pw" not in str(err)


def test_a_file_url_names_an_absolute_path_and_never_a_host(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``file://exp1`` reads ``exp1`` as a host: refused, never taken for the current folder
    (where ``prune`` would act) nor silently for ``./exp1``."""
    from savegame.storage import as_store, locate

    assert urls.file_path(f"file://{tmp_path}/a%20b") == f"{tmp_path}/a b"
    assert urls.file_path(f"file://localhost{tmp_path}") == str(tmp_path)
    for bad in ("file://exp1", "file://exp1/step-000000000001", "file://"):
        with pytest.raises(errors.UnsupportedURLError, match="file:///abs/path"):
            urls.file_path(bad)
    with pytest.raises(errors.UnsupportedURLError):
        as_store("file://exp1")
    with pytest.raises(errors.UnsupportedURLError):
        locate("file://exp1/step-000000000001")
