"""The command line on URLs (issue 11): ``ls``/``show``/``verify``/``prune``/``convert``/``diff``
take a URL where they take a path, ``push``/``pull`` move runs, and no credential given in a URL
(``user:secret@``, ``?token=``) is ever printed, on stdout or stderr, in output or errors.

Against moto's S3 server on loopback (started here: tests/remote/conftest.py's fixtures are not
visible from this folder)."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

import savegame as sg
from savegame.cli import main as cli
from savegame.cli.main import main

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")

pytestmark = pytest.mark.network

KEY, SECRET = "testing-key", "testing-secret-XyZ"
TOKEN = "tok-SeCrEt-123"
_buckets = itertools.count()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the endpoint in the environment, the credentials not (tests give them)."""
    import boto3

    name = f"sg-cli-{os.getpid()}-{next(_buckets)}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
        region_name="us-east-1",
    ).create_bucket(Bucket=name)  # fmt: skip
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return name


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch, bucket: str) -> None:
    """Credentials the usual way: in the environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # wide: a wrapped line could split a secret and hide it from the assertions below
    monkeypatch.setattr(cli, "console", Console(width=1000, emoji=False))
    monkeypatch.setattr(cli, "err_console", Console(width=1000, stderr=True, emoji=False))


def _local_run(tmp_path: Path, steps: int = 3) -> Path:
    root = tmp_path / "run"
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    state = sg.TrainState(model=model, extras={"epoch": 1})
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=10), handle_signals=False
    ) as ck:
        for s in range(1, steps + 1):
            with torch.no_grad():
                model.weight.add_(1.0)  # each checkpoint differs from the one before
            ck.step(state, s, metrics={"val_acc": 0.5 + s / 100})
    return root


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the CLI; (exit status, stdout + stderr), checked to hold no secret."""
    code = main(list(argv))
    out = capsys.readouterr()
    both = out.out + out.err
    for secret in (SECRET, TOKEN):
        assert secret not in both, both
    return code, both


@pytest.fixture
def pushed(tmp_path: Path, bucket: str, creds: None, capsys: pytest.CaptureFixture[str]) -> str:
    """A 3-checkpoint run pushed to s3://bucket/runs/exp; returns the URL."""
    url = f"s3://{bucket}/runs/exp"
    code, out = _cli(capsys, "push", str(_local_run(tmp_path)), url, "--no-progress")
    assert code == 0, out
    assert "3 checkpoints copied" in out and "all verified" in out
    return url


def test_push_ls_show_verify_pull_on_a_url(
    pushed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _cli(capsys, "ls", pushed)
    assert code == 0 and pushed in out and "(3 checkpoints" in out and "val_acc=0.53" in out
    code, out = _cli(capsys, "ls", pushed, "--verify")
    assert code == 0, out
    code, out = _cli(capsys, "verify", pushed)
    assert code == 0 and "all 3 verified" in out
    code, out = _cli(capsys, "verify", pushed + "/step-000000000002")
    assert code == 0 and "ok" in out and "step-000000000002" in out
    code, out = _cli(capsys, "show", pushed)
    assert code == 0 and "float32[2, 3]" in out and "step 3" in out
    code, out = _cli(capsys, "show", pushed + "/step-000000000001")
    assert code == 0 and "step 1" in out
    # pull it back; a second pull (and push) skips everything
    dest = tmp_path / "pulled"
    code, out = _cli(capsys, "pull", pushed, str(dest), "--no-progress")
    assert code == 0 and "3 checkpoints copied" in out and "all verified" in out
    code, out = _cli(capsys, "pull", pushed, str(dest), "--no-progress")
    assert code == 0 and "0 checkpoints copied, 3 already there" in out
    code, out = _cli(capsys, "push", str(tmp_path / "run"), pushed, "--no-progress", "--step", "2")
    assert code == 0 and "0 checkpoints copied, 1 already there" in out
    assert _cli(capsys, "verify", str(dest))[0] == 0


def test_verify_on_a_url_finds_a_damaged_object(
    pushed: str, endpoint: str, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY,
                      aws_secret_access_key=SECRET, region_name="us-east-1")  # fmt: skip
    key = "runs/exp/step-000000000002/rank-00000.safetensors"
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    code, out = _cli(capsys, "verify", pushed)
    assert code == 1 and "FAIL" in out and "step-000000000002" in out
    code, out = _cli(capsys, "ls", pushed, "--verify")
    assert code == 1 and "step 2: " in out


def test_prune_on_a_url(pushed: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(capsys, "prune", pushed, "--keep-last", "1", "--dry-run")
    assert code == 0 and "2 would be deleted" in out
    code, out = _cli(capsys, "prune", pushed, "--keep-last", "1")
    assert code == 0 and "deleted 2 checkpoints" in out
    code, out = _cli(capsys, "ls", pushed)
    assert code == 0 and "(1 checkpoints" in out
    code, out = _cli(capsys, "prune", pushed + "/step-000000000003", "--keep-last", "1")
    assert code == 2 and "is one checkpoint" in out and f"savegame prune {pushed}`" in out


def test_prune_refuses_a_read_only_http_url(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(capsys, "prune", f"http://user:{SECRET}@127.0.0.1:9/runs/exp")
    assert code == 2 and "read-only" in out and "http://***@127.0.0.1:9/runs/exp" in out
    assert SECRET not in out


def test_ls_refuses_a_checkpoint_url_and_names_its_run(
    pushed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _cli(capsys, "ls", pushed + "/step-000000000001")
    assert code == 2 and "is one checkpoint" in out and f"savegame ls {pushed}`" in out


def test_plot_on_a_url(pushed: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``savegame plot`` takes a URL like every command (it used to look for a local folder
    named "s3:")."""
    code, out = _cli(capsys, "plot", pushed)
    assert code == 0 and pushed in out and "3 checkpoints, steps 1..3" in out, out
    assert "val_acc" in out and "0.53" in out
    code, out = _cli(capsys, "plot", pushed + "/step-000000000001")
    assert code == 2 and "is one checkpoint" in out and f"savegame plot {pushed}`" in out


def test_nothing_at_the_url(bucket: str, creds: None, capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("ls", "verify", "show", "prune", "plot"):
        code, out = _cli(capsys, cmd, f"s3://{bucket}/nothing/here")
        assert code == 2 and "no run folder or checkpoint there" in out, (cmd, out)


def test_missing_bucket_is_a_clear_error(
    bucket: str, creds: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _cli(capsys, "ls", f"s3://{bucket}-absent/runs/exp")
    assert code == 2 and "error:" in out and f"{bucket}-absent" in out and "does not exist" in out


def test_credentials_in_the_url_are_used_and_never_printed(
    tmp_path: Path, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{KEY}:{SECRET}@{bucket}/runs/exp"
    shown = f"s3://***@{bucket}/runs/exp"
    code, out = _cli(capsys, "push", str(_local_run(tmp_path, steps=2)), url, "--no-progress")
    assert code == 0 and shown in out
    for argv in (("ls", url), ("ls", url, "--verify"), ("verify", url), ("show", url),
                 ("verify", url + "/step-000000000001"), ("prune", url, "--keep-last", "5"),
                 ("pull", url, str(tmp_path / "back"), "--no-progress"),
                 ("-v", "verify", url)):  # fmt: skip
        code, out = _cli(capsys, *argv)
        assert code == 0, (argv, out)
        assert shown in out or "***" in out or argv[0] == "prune", (argv, out)
    # errors quote the URL redacted too
    code, out = _cli(capsys, "ls", url + "/step-000000000001")
    assert code == 2 and shown + "/step-000000000001" in out
    code, out = _cli(capsys, "ls", f"s3://{KEY}:{SECRET}@{bucket}/nothing")
    assert code == 2 and f"s3://***@{bucket}/nothing" in out


def test_wrong_credentials_in_the_url(bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(capsys, "ls", f"s3://nobody:{SECRET}@{bucket}/runs/exp")
    assert code == 2 and "error:" in out


def test_tokens_in_query_strings_are_never_printed(
    tmp_path: Path, endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    web = endpoint.removeprefix("http://")  # a live server that answers these with 4xx
    cases = [
        ("ls", f"http://127.0.0.1:9/runs/exp?token={TOKEN}"),  # refused: the client's retries
        ("ls", f"http://{web}/runs/exp?token={TOKEN}"),
        ("show", f"http://u:{SECRET}@{web}/runs/exp?sig={TOKEN}&a=b"),
        ("verify", f"http://{web}/runs/exp/step-000000000001?X-Amz-Signature={TOKEN}"),
        ("pull", f"http://{web}/runs/exp?token={TOKEN}", str(tmp_path / "x"), "--no-progress"),
        ("ls", f"ftp://user:{SECRET}@host/runs?token={TOKEN}"),  # an unknown scheme
        ("push", str(tmp_path), f"gopher://u:{SECRET}@h/r", "--no-progress"),
        ("diff", f"http://{web}/a?token={TOKEN}", f"http://{web}/b?token={TOKEN}"),
        ("convert", str(tmp_path), f"s3://u:{SECRET}@b/out?token={TOKEN}", "--to", "savegame"),
    ]
    for argv in cases:
        code, out = _cli(capsys, *argv)
        assert code != 0 and ("error:" in out or "FAIL" in out), (argv, out)
    code, out = _cli(capsys, "ls", f"ftp://user:{SECRET}@host/runs")
    assert "s3://" in out and "gs://" in out  # the supported schemes are listed


def _http_server(root: Path) -> Any:
    """tests/remote/servers.py's HTTPFileServer over ``root`` (that folder's fixtures are not
    visible from here; the module imports nothing from the tests)."""
    name = "sg_cli_remote_servers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).parents[1] / "remote" / "servers.py"
        )
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name].HTTPFileServer(root)


@pytest.fixture
def web_run(tmp_path: Path) -> Iterator[Any]:
    """A 2-checkpoint run folder served by a plain web server (``<server.url>/run``)."""
    www = tmp_path / "www"
    shutil.copytree(_local_run(tmp_path, steps=2), www / "run")
    server = _http_server(www)
    try:
        yield server
    finally:
        server.close()


def test_a_run_on_a_plain_web_server(
    web_run: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://user:{SECRET}@{web_run.url.removeprefix('http://')}/run"
    for argv in (("ls", url), ("verify", url), ("show", url), ("ls", url, "--verify"),
                 ("pull", url, str(tmp_path / "pulled"), "--no-progress")):  # fmt: skip
        code, out = _cli(capsys, *argv)
        assert code == 0 and "http://***@127.0.0.1" in out, (argv, out)
    code, out = _cli(capsys, "prune", url, "--keep-last", "1")
    assert code == 2 and "read-only" in out
    web_run.listing = "html"
    code, out = _cli(capsys, "verify", url)
    assert code == 0 and "all 2 verified" in out


def test_a_web_run_behind_a_token_url(
    web_run: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # obstore's HTTP store would drop the query from every file's request, so a token URL is
    # refused with a typed error (exit 2) that shows the URL redacted, never half-served.
    url = f"{web_run.url}/run?token={TOKEN}"
    for argv in (("ls", url), ("verify", url), ("show", url + "/step-000000000001"),
                 ("pull", url, str(tmp_path / "pulled"), "--no-progress")):  # fmt: skip
        code, out = _cli(capsys, *argv)
        assert code == 2 and "token=***" in out and "query string" in out, (argv, out)
        assert TOKEN not in out


def test_file_urls_are_local_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _local_run(tmp_path, steps=2)
    code, out = _cli(capsys, "ls", root.as_uri())
    assert code == 0 and "(2 checkpoints" in " ".join(out.split())  # the title may wrap
    assert _cli(capsys, "verify", root.as_uri())[0] == 0


def test_convert_and_diff_read_urls(
    pushed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "w.safetensors"
    code, out = _cli(capsys, "convert", pushed, str(out_file), "--to", "safetensors")
    assert code == 0 and out_file.is_file(), out
    code, out = _cli(capsys, "diff", pushed, str(tmp_path / "run"))  # the newest of each
    assert code == 0 and " 0 differ in value" in out, out
    code, out = _cli(capsys, "diff", pushed + "/step-000000000001", pushed)
    assert code == 1 and "model/weight" in out and "1 differ in value" in out, out
