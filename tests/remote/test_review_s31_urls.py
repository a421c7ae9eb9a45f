"""Review S31: every CLI command x every URL form a user can type (issue 11).

``ls``, ``show``, ``verify``, ``prune``, ``convert``, ``diff``, ``push``, ``pull`` run in this
process through ``savegame.cli.main.main`` against real servers on loopback (moto's S3 and the
HTTP file server of ``tests/remote/conftest.py``, plus tiny canned servers started here: an S3
endpoint answering one error, an instance-metadata endpoint without a role, a web server that
answers an HTML page for every path). Checked, as README.md, docs/remote.md and
docs/transfer.md promise:

- URL forms: ``file://`` with ``%20``, ``file://localhost/…``, upper-case schemes, trailing and
  doubled slashes, query strings, fragments; unknown schemes list the supported ones;
- exit statuses 0 / 1 (a check found problems) / 2 (bad input, a savegame error);
- no secret (``user:pass@``, ``?X-Amz-Signature=``, Azure ``?sig=``, ``?token=``,
  ``?access_token=``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) in stdout, stderr, a
  ``savegame`` log record at DEBUG, an exception's text or repr, or a progress bar;
- missing credentials / bucket, access denied, HTML instead of bytes, a manifest that lies:
  a clear error naming the URL, and nothing half-written that looks complete.

What already has tests elsewhere (tests/cli/test_cli_remote.py, tests/remote/test_push_pull.py,
test_outside_s30_transfer.py, test_outside_s18_remote.py) is not repeated here. Bugs found are
strict xfails: they flip to XPASS (a failure) once fixed.
"""

from __future__ import annotations

import dataclasses
import http.server
import logging
import shutil
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch
from rich.console import Console

import savegame as sg
from savegame.cli import commands as cli_commands
from savegame.cli import main as cli
from savegame.cli.main import main
from savegame.format import layout, manifest
from savegame.tools import transfer

from .servers import HTTPFileServer

pytestmark = pytest.mark.network

PW = "pw-SeCrEt-s31"  # a password in a URL
TOKEN = "tok-SeCrEt-s31"  # a token / signature in a URL's query
ENV_SECRET = "env-SeCrEt-s31"  # AWS_SECRET_ACCESS_KEY
ENV_TOKEN = "sess-SeCrEt-s31"  # AWS_SESSION_TOKEN
SECRETS = (PW, TOKEN, ENV_SECRET, ENV_TOKEN)
STEP1, STEP2 = layout.step_dir(1), layout.step_dir(2)
DATA = "rank-00000.safetensors"
SCHEMES_LISTED = ("s3://", "gs://", "az://", "http://", "https://", "file://", "memory://")


# ---- helpers -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _wide_console_and_fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # wide: a wrapped line could split a secret and hide it from the assertions
    monkeypatch.setattr(cli, "console", Console(width=1000, emoji=False))
    monkeypatch.setattr(cli, "err_console", Console(width=1000, stderr=True, emoji=False))
    monkeypatch.setattr(transfer, "BACKOFF", 0.01)


def _no_secret(text: str, what: object) -> None:
    for s in SECRETS:
        assert s not in text, f"{s!r} shown in {what}:\n{text[-3000:]}"
    # a secret cut at the first "/" or ":" would still give part of it away
    for s in SECRETS:
        assert s.split("-")[1] not in text, f"part of {s!r} shown in {what}:\n{text[-3000:]}"


@pytest.fixture
def cli_run(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> Callable[..., tuple[int, str]]:
    """``cli_run(*argv)``: run the CLI in this process; (exit status, stdout + stderr). Checks
    that no secret reached stdout, stderr or a ``savegame`` log record (DEBUG and up), and that
    no traceback was printed."""
    caplog.set_level(logging.DEBUG, logger="savegame")

    def run(*argv: object) -> tuple[int, str]:
        caplog.clear()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse, a closed pipe
            code = exc.code if isinstance(exc.code, int) else 2
        out = capsys.readouterr()
        both = out.out + out.err
        _no_secret(both, argv)
        assert "Traceback" not in both, both
        for rec in caplog.records:
            if rec.name.startswith("savegame"):
                text = rec.getMessage() + (
                    "".join(traceback.format_exception(*rec.exc_info)) if rec.exc_info else ""
                )
                _no_secret(text, f"log record {rec.name} of {argv}")
        return code, both

    return run


def _exc_texts(exc: BaseException) -> str:
    """Everything a user or a log can see of an exception: its text, repr, args, traceback
    (with the causes and contexts chained to it)."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts += [str(e), repr(e), repr(e.args), repr(getattr(e, "path", None))]
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _make_run(root: Path, steps: tuple[int, ...] = (1, 2)) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    state = sg.TrainState(model=model, extras={"epoch": 1}, rng=False)
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=10), handle_signals=False
    ) as ck:
        for s in steps:
            with torch.no_grad():
                model.weight.add_(1.0)  # each checkpoint owns its bytes
            ck.step(state, s, metrics={"val_acc": 0.5 + s / 100})
    return root


@pytest.fixture(scope="module")
def _template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_run(tmp_path_factory.mktemp("s31-template") / "run")


@pytest.fixture
def local_run(_template: Path, tmp_path: Path) -> Path:
    """A 2-checkpoint run folder whose path has a space in it."""
    root = tmp_path / "my run"
    shutil.copytree(_template, root)
    return root


@pytest.fixture
def pushed(s3_url: str, local_run: Path) -> str:
    assert transfer.push(local_run, s3_url).verified
    return s3_url


@pytest.fixture
def http_run(http_server: HTTPFileServer, local_run: Path) -> str:
    shutil.copytree(local_run, http_server.root / "run")
    return http_server.url_for("run")


def _steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(
        int(p.name[5:])
        for p in root.iterdir()
        if p.name.startswith("step-") and (p / layout.MANIFEST).is_file()
    )


def _every_command(url: str, tmp_path: Path, local: Path) -> list[tuple[str, ...]]:
    """Each command with ``url`` where it reads or writes a run."""
    return [
        ("ls", url),
        ("show", url),
        ("verify", url),
        ("prune", url, "--keep-last", "1"),
        ("diff", url, str(local)),
        ("convert", url, str(tmp_path / "out.safetensors"), "--to", "safetensors"),
        ("pull", url, str(tmp_path / "pulled"), "--no-progress"),
        ("push", str(local), url, "--no-progress"),
    ]


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[type[http.server.BaseHTTPRequestHandler]], str]]:
    """``serve(Handler) -> "http://127.0.0.1:PORT"``: a threaded server for the test."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(handler: type[http.server.BaseHTTPRequestHandler]) -> str:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(
            target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    try:
        yield start
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def _s3_error_endpoint(
    serve: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    body: Callable[[Any], str],
) -> None:
    """Point the S3 client at a server answering every request with ``status`` and
    ``body(handler)`` (XML), with credentials (secret ones) in the environment."""

    class H(_Quiet):
        def _reply(self) -> None:
            data = body(self).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _reply

    endpoint = serve(H)
    for k, v in {
        "AWS_ACCESS_KEY_ID": "AKIAS31EXAMPLE",
        "AWS_SECRET_ACCESS_KEY": ENV_SECRET,
        "AWS_SESSION_TOKEN": ENV_TOKEN,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }.items():
        monkeypatch.setenv(k, v)


def _relie(mpath_bytes: bytes, path: str, how: str) -> bytes:
    """A manifest that lies (``size``: its first file is 8 bytes longer than it is; ``hash``:
    a tensor chunk's hash is wrong) and still has a valid self-hash: the lie of a server."""
    m = manifest.Manifest.from_bytes(mpath_bytes, path)
    if how == "size":
        name, entry = next(iter(m.files.items()))
        m = dataclasses.replace(
            m, files={**m.files, name: dataclasses.replace(entry, size=entry.size + 8)}
        )
    else:
        tname, tentry = next(iter(m.tensors.items()))
        chunk = dataclasses.replace(tentry.chunks[0], hash="0" * 32)
        tentry = dataclasses.replace(tentry, chunks=(chunk, *tentry.chunks[1:]))
        m = dataclasses.replace(m, tensors={**m.tensors, tname: tentry})
    return m.to_bytes()


# ---- file:// -----------------------------------------------------------------------------------
FILE_FORMS = {
    "percent-escaped": lambda p: "file://" + quote(str(p)),
    "localhost": lambda p: "file://localhost" + quote(str(p)),
    "upper-case scheme": lambda p: "FILE://" + quote(str(p)),
    "trailing slash": lambda p: "file://" + quote(str(p)) + "/",
    "doubled slash": lambda p: "file://" + quote(str(p.parent)) + "//" + quote(p.name),
    "query string": lambda p: "file://" + quote(str(p)) + "?x=1",
    "fragment": lambda p: "file://" + quote(str(p)) + "#top",
}


@pytest.mark.parametrize("form", list(FILE_FORMS))
def test_file_url_forms_name_the_local_run(
    form: str, local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]]
) -> None:
    url = FILE_FORMS[form](local_run)
    code, out = cli_run("ls", url)
    assert code == 0 and "(2 checkpoints" in out, out
    assert cli_run("verify", url)[0] == 0
    code, out = cli_run("show", url)
    assert code == 0 and "step 2" in out, out
    code, out = cli_run("prune", url, "--keep-last", "1", "--dry-run")
    assert code == 0 and "1 would be deleted" in out, out
    code, out = cli_run("diff", url, local_run)
    assert code == 0 and " 0 differ in value" in out, out
    dst = tmp_path / "w.safetensors"
    code, out = cli_run("convert", url, dst, "--to", "safetensors")
    assert code == 0 and dst.is_file(), out
    assert cli_run("verify", url.split("?")[0].split("#")[0].rstrip("/") + "/" + STEP1)[0] == 0


def test_file_url_escapes_are_decoded_for_push_and_pull_destinations(
    local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]]
) -> None:
    dest = tmp_path / "dest dir"
    code, out = cli_run("push", local_run, "file://" + quote(str(dest)), "--no-progress")
    assert code == 0 and "2 checkpoints copied" in out, out
    assert _steps(dest) == [1, 2] and not (tmp_path / "dest%20dir").exists()
    back = tmp_path / "back 100%"
    code, out = cli_run(
        "pull", "file://localhost" + quote(str(dest)), "file://" + quote(str(back)), "--no-progress"
    )
    assert code == 0 and "all verified" in out, out
    assert _steps(back) == [1, 2] and cli_run("verify", back)[0] == 0


def test_file_url_naming_a_host_is_refused_by_every_command(
    local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in _every_command("file://exp1/run", tmp_path, local_run):
        code, out = cli_run(*argv)
        assert code == 2 and "file:///abs/path" in out, (argv, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made in the cwd


def test_rfc8089_one_slash_file_url_is_the_absolute_path_or_refused(
    local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, out = cli_run("ls", "file:" + quote(str(local_run)))
    assert code == 0 or (code == 2 and "file:///" in out), out
    code, out = cli_run("push", local_run, "file:" + quote(str(tmp_path / "dest")), "--no-progress")
    assert not (tmp_path / "file:").exists(), "push wrote a run into ./file:/…"
    assert code == 2 or _steps(tmp_path / "dest") == [1, 2], out


# ---- unknown schemes -----------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["hdfs", "ftp", "s4", "gopher"])
def test_unknown_scheme_is_refused_by_every_command_listing_the_known_ones(
    scheme: str, local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]]
) -> None:
    url = f"{scheme}://user:{PW}@host/runs/exp?token={TOKEN}"
    shown = f"{scheme}://***@host/runs/exp?token=***"
    argvs = _every_command(url, tmp_path, local_run) + [
        ("pull", str(local_run), url, "--no-progress"),  # an unknown destination of a pull
        ("push", url, str(tmp_path / "dst"), "--no-progress"),  # an unknown source of a push
        ("diff", str(local_run), url),
    ]
    for argv in argvs:
        code, out = cli_run(*argv)
        assert code == 2 and f"unknown URL scheme '{scheme}://'" in out, (argv, out)
        assert all(s in out for s in SCHEMES_LISTED), (argv, out)
        if argv[0] in ("ls", "show", "verify", "prune", "push", "pull"):
            assert shown in out, (argv, out)
    assert not (tmp_path / "dst").exists() and not (tmp_path / "pulled").exists()
    with pytest.raises(sg.UnsupportedURLError) as info:
        sg.pull(url, tmp_path / "dst")
    assert isinstance(info.value, sg.StorageError) and isinstance(info.value, ValueError)
    _no_secret(_exc_texts(info.value), "UnsupportedURLError")


@pytest.mark.parametrize("url", ["s4://bkt/runs/exp", "s3://bkt-s31//runs/exp"])
def test_convert_and_diff_name_the_whole_url_in_errors(
    url: str, s3_env: Any, local_run: Path, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    for argv in (("convert", url, tmp_path / "o.safetensors", "--to", "safetensors"),
                 ("diff", url, local_run)):  # fmt: skip
        code, out = cli_run(*argv)
        assert code == 2 and url in out, (argv, out)


# ---- upper-case schemes, memory:// ----------------------------------------------------------------
def test_upper_case_s3_scheme_works_for_every_command(
    pushed: str, local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]]
) -> None:
    url = "S3://" + pushed.removeprefix("s3://")
    code, out = cli_run("ls", url)
    assert code == 0 and "(2 checkpoints" in out, out
    assert cli_run("verify", url)[0] == 0
    assert cli_run("verify", f"{url}/{STEP1}")[0] == 0
    code, out = cli_run("show", url)
    assert code == 0 and "step 2" in out, out
    code, out = cli_run("diff", url, local_run)
    assert code == 0 and " 0 differ in value" in out, out
    assert cli_run("convert", url, tmp_path / "w.safetensors", "--to", "safetensors")[0] == 0
    code, out = cli_run("pull", url, tmp_path / "back", "--no-progress")
    assert code == 0 and _steps(tmp_path / "back") == [1, 2], out
    code, out = cli_run("push", local_run, url, "--no-progress")
    assert code == 0 and "0 checkpoints copied, 2 already there" in out, out
    code, out = cli_run("prune", url, "--keep-last", "1")
    assert code == 0 and "deleted 1 checkpoints" in out, out
    code, out = cli_run("ls", pushed)  # the same run as the lower-case URL names
    assert code == 0 and "(1 checkpoints" in out, out


def test_upper_case_http_and_memory_schemes(
    http_run: str, local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]]
) -> None:
    url = "HTTP://" + http_run.removeprefix("http://")
    for argv in (("ls", url), ("verify", url), ("show", url), ("diff", url, local_run),
                 ("pull", url, tmp_path / "back", "--no-progress")):  # fmt: skip
        code, out = cli_run(*argv)
        assert code == 0, (argv, out)
    assert _steps(tmp_path / "back") == [1, 2]
    code, out = cli_run("prune", url, "--keep-last", "1")
    assert code == 2 and "read-only" in out, out
    mem = f"MEMORY://s31-{tmp_path.name}/runs/exp"
    code, out = cli_run("push", local_run, mem, "--no-progress")
    assert code == 0 and "2 checkpoints copied" in out, out
    code, out = cli_run("ls", mem.replace("MEMORY://", "memory://"))
    assert code == 0 and "(2 checkpoints" in out, out


def test_memory_urls_work_for_every_command(
    local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]]
) -> None:
    url = f"memory://s31-{tmp_path.name}-all/runs/exp"
    code, out = cli_run("push", local_run, url, "--no-progress")
    assert code == 0, out
    assert cli_run("ls", url)[0] == 0
    assert cli_run("verify", url)[0] == 0
    assert cli_run("show", f"{url}/{STEP1}")[0] == 0
    assert cli_run("diff", url, local_run)[0] == 0
    assert cli_run("convert", url, tmp_path / "m.safetensors", "--to", "safetensors")[0] == 0
    assert cli_run("pull", url, tmp_path / "back", "--no-progress")[0] == 0
    code, out = cli_run("prune", url, "--keep-last", "1")
    assert code == 0 and "deleted 1 checkpoints" in out, out
    code, out = cli_run("ls", "memory://")
    assert code == 2 and "memory://" in out, out


def test_s3_bucket_name_case_is_not_changed(
    pushed: str, cli_run: Callable[..., tuple[int, str]]
) -> None:
    bucket = pushed.split("/")[2]
    upper = pushed.replace(bucket, bucket.upper(), 1)
    code, out = cli_run("ls", upper)
    assert code == 2, f"{upper} listed the run of s3://{bucket}:\n{out}"


# ---- s3:// and http(s):// URL forms ------------------------------------------------------------
@pytest.mark.parametrize("form", ["trailing slash", "query string", "fragment"])
def test_s3_url_forms_every_command(
    form: str, pushed: str, local_run: Path, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    url = {"trailing slash": pushed + "/", "query string": pushed + "?versionId=v1",
           "fragment": pushed + "#latest"}[form]  # fmt: skip
    code, out = cli_run("ls", url)
    assert code == 0 and "(2 checkpoints" in out, out
    assert cli_run("verify", url)[0] == 0
    code, out = cli_run("show", url)
    assert code == 0 and "step 2" in out, out
    assert cli_run("diff", url, local_run)[0] == 0
    assert cli_run("convert", url, tmp_path / "w.safetensors", "--to", "safetensors")[0] == 0
    code, out = cli_run("push", local_run, url, "--no-progress")
    assert code == 0 and "0 checkpoints copied, 2 already there" in out, out
    code, out = cli_run("pull", url, tmp_path / "back", "--no-progress")
    assert code == 0 and _steps(tmp_path / "back") == [1, 2], out
    code, out = cli_run("prune", url, "--keep-last", "1", "--dry-run")
    assert code == 0 and "1 would be deleted" in out, out
    if form == "trailing slash":
        code, out = cli_run("verify", f"{pushed}/{STEP1}/")
        assert code == 0 and STEP1 in out, out
        code, out = cli_run("pull", f"{pushed}/{STEP1}/", tmp_path / "one", "--no-progress")
        assert code == 0 and _steps(tmp_path / "one") == [1], out


def test_s3_url_with_an_empty_path_segment_is_a_clear_error(
    pushed: str, local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]]
) -> None:
    bucket = pushed.split("/")[2]
    for url in (pushed + "//", f"s3://{bucket}//runs/exp"):
        for argv in _every_command(url, tmp_path, local_run):
            code, out = cli_run(*argv)
            assert code == 2 and "error:" in out, (argv, out)
            if argv[0] not in ("diff", "convert"):  # those: see the xfail above
                assert url in out, (argv, out)
    assert _steps(tmp_path / "pulled") == []


@pytest.mark.parametrize("form", ["trailing slash", "doubled slash", "fragment"])
def test_http_url_forms_read_commands(
    form: str, http_run: str, local_run: Path, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    host, path = http_run.rsplit("/", 1)
    url = {"trailing slash": http_run + "/", "doubled slash": f"{host}//{path}",
           "fragment": http_run + "#x"}[form]  # fmt: skip
    code, out = cli_run("ls", url)
    assert code == 0 and "(2 checkpoints" in out, out
    assert cli_run("verify", url)[0] == 0
    assert cli_run("show", url)[0] == 0
    assert cli_run("diff", url, local_run)[0] == 0
    assert cli_run("convert", url, tmp_path / "w.safetensors", "--to", "safetensors")[0] == 0
    code, out = cli_run("pull", url, tmp_path / "back", "--no-progress")
    assert code == 0 and _steps(tmp_path / "back") == [1, 2], out


def test_http_is_a_typed_read_only_refusal_for_every_writing_command(
    http_run: str, http_server: HTTPFileServer, local_run: Path, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    url = http_run.replace("http://", f"http://user:{PW}@")
    shown = http_run.replace("http://", "http://***@")
    before = sorted(str(p) for p in http_server.root.rglob("*"))
    for argv in (("prune", url, "--keep-last", "1"), ("prune", url, "--keep-last", "1", "--dry-run"),
                 ("push", local_run, url + "-copy", "--no-progress"),
                 ("push", local_run, url, "--no-progress"),
                 ("pull", local_run, url + "-copy", "--no-progress"),  # an http destination
                 ("pull", url, url + "-copy", "--no-progress")):  # fmt: skip
        code, out = cli_run(*argv)
        assert code == 2 and "read-only" in out and shown in out, (argv, out)
    code, out = cli_run("convert", local_run, url + "-w.safetensors", "--to", "safetensors")
    assert code == 2 and "local" in out and shown in out, out
    assert sorted(str(p) for p in http_server.root.rglob("*")) == before
    with pytest.raises(sg.StorageError, match="read-only") as info:
        sg.push(local_run, url + "-copy")
    _no_secret(_exc_texts(info.value), "push to http")


# ---- secrets -------------------------------------------------------------------------------------
def test_secrets_in_urls_never_shown_when_commands_fail(
    s3_env: Any, http_server: HTTPFileServer, local_run: Path, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    web = http_server.url.removeprefix("http://")
    urls = [
        f"http://user:{PW}@{web}/no/such/run",  # 404
        f"s3://no-such-bucket-s31/runs/exp?X-Amz-Signature={TOKEN}&X-Amz-Credential=AKIA",
        f"s3://AKIAS31:{PW}@no-such-bucket-s31/runs/exp",
        f"az://container/runs/exp?sv=2022-11-02&se=2030-01-01&sp=rl&sig={TOKEN}",
        f"http://{web}/run?token={TOKEN}",
        f"http://{web}/run?access_token={TOKEN}",
    ]
    for var in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_KEY"):
        monkeypatch.delenv(var, raising=False)
    for url in urls:
        for argv in _every_command(url, tmp_path, local_run):
            code, _out = cli_run(*argv)
            assert code == 2, (argv, _out)
    # an unreachable server: the client's retries, then the error (one command: it takes ~1 s)
    code, out = cli_run("ls", f"http://user:{PW}@127.0.0.1:9/run")
    assert code == 2 and "http://***@127.0.0.1:9/run" in out, out
    assert not (tmp_path / "pulled").exists()


@pytest.mark.parametrize("scheme", ["s3", "http"])
def test_a_password_with_a_slash_in_a_url_is_never_shown(
    scheme: str, s3_env: Any, local_run: Path, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    from savegame.storage import urls

    secret = f"wJalr/{PW}+bPx"  # the shape of a real AWS secret access key
    url = f"{scheme}://AKIAS31:{secret}@bucket-s31/runs/exp"
    assert "wJalr" not in urls.redact(url) and PW not in urls.redact(url)
    for argv in _every_command(url, tmp_path, local_run):
        code, out = cli_run(*argv)
        assert code == 2 and "wJalr" not in out, (argv, out)
        assert "bucket-s31/runs/exp" in out, (argv, out)  # the error names the URL


def test_a_token_in_a_url_fragment_is_never_shown(
    pushed: str, cli_run: Callable[..., tuple[int, str]]
) -> None:
    code, _out = cli_run("ls", f"{pushed}#access_token={TOKEN}")
    assert code == 0


def test_log_records_of_a_prune_on_a_url_with_credentials_hold_no_secret(
    pushed: str, cli_run: Callable[..., tuple[int, str]], caplog: pytest.LogCaptureFixture
) -> None:
    url = pushed.replace("s3://", f"s3://AKIAS31:{PW}@", 1) + f"?X-Amz-Signature={TOKEN}"
    code, out = cli_run("prune", url, "--keep-last", "1")  # cli_run checks the log records
    assert code == 0 and "deleted 1 checkpoints" in out, out
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("savegame")]
    assert any("deleted step-000000000001" in m for m in logged), logged  # the check saw them


def test_secret_environment_never_shown_when_s3_commands_fail(
    pushed: str, local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)  # moto accepts any key
    monkeypatch.setenv("AWS_SESSION_TOKEN", ENV_TOKEN)
    bucket = pushed.split("/")[2]
    for url in (f"s3://{bucket}-missing/runs/exp", f"s3://{bucket}/wrong/path"):
        for argv in _every_command(url, tmp_path, local_run):
            if argv[0] == "push":
                continue  # pushing into a wrong path of an existing bucket succeeds
            code, out = cli_run(*argv)
            assert code == 2 and "error:" in out, (argv, out)
    code, out = cli_run("verify", pushed)  # the same credentials work
    assert code == 0, out


def test_typed_errors_from_the_api_hold_no_secret(
    s3_env: Any, http_server: HTTPFileServer, local_run: Path, tmp_path: Path
) -> None:
    from savegame.engine import reader
    from savegame.storage import as_store

    web = http_server.url.removeprefix("http://")
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("pull http 404", lambda: sg.pull(f"http://u:{PW}@{web}/nope", tmp_path / "d1")),
        ("pull s3 bucket", lambda: sg.pull(f"s3://K:{PW}@no-such-s31/r?sig={TOKEN}", tmp_path / "d2")),
        ("push s3 bucket", lambda: sg.push(local_run, f"s3://K:{PW}@no-such-s31/r?t={TOKEN}")),
        ("list s3 bucket", lambda: reader.list_checkpoints(f"s3://no-such-s31/r?X-Amz-Signature={TOKEN}")),
        ("open http 404", lambda: sg.open(f"http://u:{PW}@{web}/nope/{STEP1}")),
        ("store ftp", lambda: as_store(f"ftp://u:{PW}@h/r?token={TOKEN}")),
        ("http token", lambda: as_store(f"http://{web}/r?access_token={TOKEN}")),
        ("load s3", lambda: sg.load(f"s3://K:{PW}@no-such-s31/r/{STEP1}")),
    ]  # fmt: skip
    for name, call in cases:
        with pytest.raises((sg.CheckpointError, OSError, ValueError)) as info:
            call()
        _no_secret(_exc_texts(info.value), name)


def test_progress_bar_lines_hold_no_secret(
    http_run: str, http_server: HTTPFileServer, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(cli_commands, "_progress", lambda args: True)  # as on a terminal
    url = http_run.replace("http://", f"http://user:{PW}@")
    code, out = cli_run("pull", url, tmp_path / "back")
    assert code == 0 and ("B/s" in out or "kB" in out or "KB" in out), out  # the bar showed
    http_server.html_for.add(f"run/{STEP2}/{DATA}")  # a failing one too
    code, out = cli_run("pull", url, tmp_path / "back2")
    assert code == 1 and "step 2" in out, out


# ---- missing credentials, missing bucket, access denied --------------------------------------------
@pytest.fixture
def no_aws_credentials(
    s3_env: Any, serve: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No AWS credentials anywhere: none in the environment, empty config files, and an
    instance-metadata endpoint that has no role (as on EC2 without one) — answered here, so the
    test never waits on 169.254.169.254."""

    class Imds(_Quiet):
        def _reply(self) -> None:
            token = self.command == "PUT"
            body = b"imds-token" if token else b""
            self.send_response(200 if token else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = _reply

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "aws-config").write_text("")
    (tmp_path / "aws-credentials").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", serve(Imds))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_missing_aws_credentials_name_what_to_set_for_every_command(
    s3_url: str, no_aws_credentials: None, local_run: Path, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    for argv in _every_command(s3_url, tmp_path, local_run):
        code, out = cli_run(*argv)
        assert code == 2 and "no valid credentials" in out, (argv, out)
        assert "AWS_ACCESS_KEY_ID" in out and "AWS_SECRET_ACCESS_KEY" in out, (argv, out)
        assert s3_url in out, (argv, out)
    assert not (tmp_path / "pulled").exists()


def test_missing_azure_account_names_what_to_set(
    local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import os

    for var in [v for v in os.environ if v.startswith(("AZURE_", "AZURITE_"))]:
        monkeypatch.delenv(var)
    for argv in (("ls", "az://container/runs/exp"),
                 ("push", local_run, "az://container/runs/exp", "--no-progress")):  # fmt: skip
        code, out = cli_run(*argv)
        assert code == 2 and "AZURE_STORAGE_ACCOUNT_NAME" in out, (argv, out)


def test_abfss_container_at_account_url_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    from savegame.storage import as_store, urls

    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "a2V5")  # no request is made
    url = "abfss://container@account.dfs.core.windows.net/runs/exp"
    as_store(url)
    assert urls.redact(url) == url  # nothing secret in it


def test_missing_bucket_every_command_names_the_url(
    s3_env: Any, local_run: Path, tmp_path: Path, cli_run: Callable[..., tuple[int, str]]
) -> None:
    url = "s3://no-such-bucket-s31b/runs/exp"
    for argv in _every_command(url, tmp_path, local_run) + [
        ("verify", f"{url}/{STEP1}"), ("show", f"{url}/{STEP1}"),
        ("pull", f"{url}/{STEP1}", tmp_path / "one", "--no-progress"),
    ]:  # fmt: skip
        code, out = cli_run(*argv)
        assert code == 2 and url in out and "does not exist" in out, (argv, out)
    assert not (tmp_path / "pulled").exists() and not (tmp_path / "one").exists()


@pytest.mark.parametrize("cmd", ["pull", "diff", "convert"])
def test_missing_bucket_is_named_as_a_missing_bucket(
    cmd: str, s3_env: Any, local_run: Path, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    url = "s3://no-such-bucket-s31c/runs/exp"
    argv = next(a for a in _every_command(url, tmp_path, local_run) if a[0] == cmd)
    code, out = cli_run(*argv)
    assert code == 2 and "bucket 'no-such-bucket-s31c' does not exist" in out, out


def test_access_denied_every_command(
    serve: Callable[..., str], monkeypatch: pytest.MonkeyPatch, local_run: Path,
    tmp_path: Path, cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    _s3_error_endpoint(
        serve, monkeypatch, 403,
        lambda h: '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
        "<Message>Access Denied</Message></Error>",
    )  # fmt: skip
    url = "s3://bucket-s31/runs/exp"
    for argv in _every_command(url, tmp_path, local_run):
        code, out = cli_run(*argv)
        assert code == 2 and "access denied" in out and url in out, (argv, out)
    assert not (tmp_path / "pulled").exists()


_EXPIRED = ["ls", "show", "verify", "prune", "diff", "convert", "pull", "push"]


@pytest.mark.parametrize("cmd", _EXPIRED)
def test_expired_session_token_is_a_credentials_error(
    cmd: str, serve: Callable[..., str], monkeypatch: pytest.MonkeyPatch, local_run: Path,
    tmp_path: Path, cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    _s3_error_endpoint(
        serve, monkeypatch, 400,
        lambda h: '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredToken</Code>'
        "<Message>The provided token has expired.</Message></Error>",
    )  # fmt: skip
    url = "s3://bucket-s31/runs/exp"
    argv = next(a for a in _every_command(url, tmp_path, local_run) if a[0] == cmd)
    code, out = cli_run(*argv)
    assert code == 2 and "no valid credentials" in out and "AWS_SESSION_TOKEN" in out, out


@pytest.mark.parametrize("cmd", ["pull", "push"])
def test_an_error_body_echoing_the_session_token_is_not_printed(
    cmd: str, serve: Callable[..., str], monkeypatch: pytest.MonkeyPatch, local_run: Path,
    tmp_path: Path, cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    _s3_error_endpoint(
        serve, monkeypatch, 400,
        lambda h: '<?xml version="1.0" encoding="UTF-8"?><Error><Code>ExpiredToken</Code>'
        "<Message>The provided token has expired.</Message><Token-0>"
        + h.headers.get("x-amz-security-token", "") + "</Token-0></Error>",
    )  # fmt: skip
    url = "s3://bucket-s31/runs/exp"
    argv = next(a for a in _every_command(url, tmp_path, local_run) if a[0] == cmd)
    code, _out = cli_run(*argv)  # cli_run fails on the token in the output
    assert code == 2


# ---- HTML instead of bytes, a lying manifest ----------------------------------------------------
class _HtmlEverywhere(_Quiet):
    """A web server (a login page, a single-page app) that answers 200 with an HTML page for
    every path, run folders and manifests included."""

    def _reply(self) -> None:
        body = (
            b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>"
            b'<a href="step-000000000001/">x</a> Please sign in</body></html>'
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _reply


def test_a_server_answering_html_everywhere(
    serve: Callable[..., str], local_run: Path, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    url = serve(_HtmlEverywhere) + "/runs/exp"
    code, out = cli_run("verify", url)
    assert code == 1 and "FAIL" in out and url in out, out
    code, out = cli_run("verify", f"{url}/{STEP1}")
    assert code == 1 and "FAIL" in out and f"{url}/{STEP1}" in out, out
    for argv in (("show", url), ("diff", url, local_run),
                 ("convert", url, tmp_path / "o.safetensors", "--to", "safetensors"),
                 ("pull", f"{url}/{STEP1}", tmp_path / "one", "--no-progress")):  # fmt: skip
        code, out = cli_run(*argv)
        assert code == 2 and url in out, (argv, out)
    code, out = cli_run("pull", url, tmp_path / "pulled", "--no-progress")
    assert code in (1, 2) and url in out, out
    assert _steps(tmp_path / "pulled") == [] and _steps(tmp_path / "one") == []
    assert not (tmp_path / "o.safetensors").exists()


def test_ls_on_a_server_answering_html_everywhere_says_what_it_got(
    serve: Callable[..., str], cli_run: Callable[..., tuple[int, str]]
) -> None:
    url = serve(_HtmlEverywhere) + "/runs/exp"
    code, out = cli_run("ls", url)
    assert code == 2 and url in out, out
    assert "one checkpoint" not in out and ("html" in out.lower() or "json" in out.lower()), out


@pytest.mark.parametrize("what", ["manifest", "data"])
def test_http_html_page_instead_of_a_manifest_or_data(
    what: str, http_run: str, http_server: HTTPFileServer, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    http_server.html_for.add(f"run/{STEP2}/{layout.MANIFEST if what == 'manifest' else DATA}")
    code, out = cli_run("verify", http_run)
    assert code == 1 and f"FAIL {http_run}/{STEP2}" in out, out
    code, out = cli_run("ls", http_run, "--verify")
    assert code == 1 and "step 2: " in out, out
    dest = tmp_path / "pulled"
    code, out = cli_run("pull", http_run, dest, "--no-progress")
    assert code == 1 and "step 2" in out, out
    assert _steps(dest) == [1] and not any(p.name.startswith(".tmp-") for p in dest.iterdir())
    assert not (dest / layout.LATEST).exists() or STEP2 not in (dest / layout.LATEST).read_text()
    assert cli_run("verify", dest)[0] == 0


@pytest.mark.parametrize("how", ["size", "hash"])
def test_s3_manifest_that_lies_verify_exits_1_and_pull_commits_nothing_of_it(
    how: str, pushed: str, s3_env: Any, tmp_path: Path,
    cli_run: Callable[..., tuple[int, str]],
) -> None:  # fmt: skip
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env.endpoint, aws_access_key_id=s3_env.access_key,
                      aws_secret_access_key=s3_env.secret_key, region_name=s3_env.region)  # fmt: skip
    bucket, _, prefix = pushed.removeprefix("s3://").partition("/")
    key = f"{prefix}/{STEP2}/{layout.MANIFEST}"
    lie = _relie(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), key, how)
    s3.put_object(Bucket=bucket, Key=key, Body=lie)
    code, out = cli_run("verify", pushed)
    assert code == 1 and f"FAIL {pushed}/{STEP2}" in out and f"ok   {pushed}/{STEP1}" in out, out
    code, out = cli_run("verify", f"{pushed}/{STEP2}")
    assert code == 1, out
    code, out = cli_run("ls", pushed, "--verify")
    assert code == 1 and "step 2: " in out, out
    dest = tmp_path / "pulled"
    code, out = cli_run("pull", pushed, dest, "--no-progress")
    assert code == 1 and "nothing of step 2 was committed" in out, out
    assert _steps(dest) == [1] and not (dest / STEP2).exists()
    assert not any(p.name.startswith(".tmp-") for p in dest.iterdir())
    assert not (dest / layout.LATEST).exists() or STEP2 not in (dest / layout.LATEST).read_text()
    assert cli_run("verify", dest)[0] == 0
    one = tmp_path / "one"  # the lying checkpoint alone
    code, out = cli_run("pull", f"{pushed}/{STEP2}", one, "--no-progress")
    assert code in (1, 2) and "nothing of step 2 was committed" in out, out
    assert _steps(one) == [] and not (one / STEP2).exists()
