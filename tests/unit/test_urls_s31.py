"""urls.redact / redact_text / connect on the URL forms review S31 found (no server needed)."""

from __future__ import annotations

import pytest

import savegame as sg
from savegame.storage import as_store, urls

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"s3://AKIA:{SECRET}@bucket/runs/exp", "s3://***@bucket/runs/exp"),
        (f"http://u:{SECRET}@host:8080/run", "http://***@host:8080/run"),
        ("s3://a:b/c", "s3://***"),  # no '@' after: nothing is a safe guess
        ("s3://b/x?TOKENVALUE", "s3://b/x?***"),
        ("s3://b/x?sig=1&se=2", "s3://b/x?sig=***&se=***"),
        ("s3://b/x#access_token=TOKENVALUE", "s3://b/x#access_token=***"),
        ("s3://b/x#TOKENVALUE", "s3://b/x#***"),
        ("http://[::1]:8080/run", "http://[::1]:8080/run"),
        ("s3://bucket/runs/exp", "s3://bucket/runs/exp"),
        (
            "abfss://container@account.dfs.core.windows.net/runs/exp",
            "abfss://container@account.dfs.core.windows.net/runs/exp",
        ),
        (
            "abfss://u:p@account.dfs.core.windows.net/r",
            "abfss://***@account.dfs.core.windows.net/r",
        ),
        ("https://token@host/run", "https://***@host/run"),  # a token as the user name
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert urls.redact(url) == shown
    for part in (SECRET, "TOKENVALUE", "wJalr"):
        assert part not in urls.redact(url)


def test_redact_text_hides_secret_environment_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FQoGZXIvYXdzEJr-session-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = (
        "400 Bad Request: <Error><Code>ExpiredToken</Code><Token-0>FQoGZXIvYXdzEJr-session-token"
        f"</Token-0></Error> key {SECRET}"
    )
    out = urls.redact_text(text)
    assert "FQoGZXIvYXdzEJr" not in out and SECRET not in out and "ExpiredToken" in out


def test_a_password_with_a_slash_is_refused_without_showing_it() -> None:
    with pytest.raises(sg.UnsupportedURLError) as info:
        as_store(f"s3://AKIA:{SECRET}@bucket/runs/exp")
    message = str(info.value)
    assert "wJalr" not in message and "s3://***@bucket/runs/exp" in message
    assert "%2F" in message


@pytest.mark.parametrize("url", ["s3://b//runs/exp", "gs://b/runs//exp", "az://c/a//b"])
def test_an_empty_path_segment_is_refused_naming_the_url(url: str) -> None:
    with pytest.raises(sg.UnsupportedURLError, match="empty path segment") as info:
        as_store(url)
    assert url in str(info.value)


def test_trailing_slash_is_fine() -> None:
    assert as_store("memory://s31-trail/runs/exp/").describe().startswith("memory://s31-trail")


def test_bucket_case_is_kept() -> None:
    a = as_store("memory://S31Case/runs")
    b = as_store("memory://s31case/runs")
    a.put("x", b"1")
    assert not b.exists("x")


def test_one_slash_file_url_is_the_absolute_path(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    store = as_store("file:" + str(tmp_path / "run"))
    assert store.local_path() == tmp_path / "run"
    assert urls.is_url("file:/abs") and urls.is_file_url("FILE:/abs")
    assert not urls.is_file_url("file:rel")
