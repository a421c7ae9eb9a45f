"""Review S31: every string savegame reads from a file or a remote object is hostile.

The objects planted here are the ones a run keeps beside its checkpoints and that savegame
quotes back to people: the object-store lease ``<run>/.lock`` (docs/remote.md "The lease": a
second writer gets ``LockedError`` naming the holder and expiry), the local ``.lock`` file,
``run.json``, ``LATEST``, and a checkpoint's manifest strings (re-signed, so they parse).

What a user relies on, whatever those objects hold:

- ``Checkpointer(root)`` either takes the run (an unreadable or expired lease is taken over)
  or raises a typed savegame error (``savegame.errors.*``) whose message is bounded and holds
  no raw control character; never a raw ``OverflowError``, ``RecursionError``, ``KeyError``…
- ``savegame ls / show / verify / diff / prune / push / pull`` exit 0, 1 or 2 (never a
  traceback), print no raw terminal control bytes, and a huge string does not make the output
  grow without bound.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

import savegame as sg
from savegame import errors
from savegame.cli import main as cli_module
from savegame.cli.main import main as cli_main
from savegame.format import layout, manifest

pytest.importorskip("obstore")
pytestmark = pytest.mark.network

STEP1 = "step-000000000001"
STEP2 = "step-000000000002"

# A character that moves the cursor, clears the screen, sets the window title, rings the bell,
# reorders what follows (bidi) or hides (zero width), or a lone surrogate (which cannot even be
# encoded for a terminal or a log file): none may reach a terminal or a message raw.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
# Printed output may of course hold line breaks (tables): everything else counts.
_OUTPUT_CONTROL = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)

#: An error message quotes a path or two and says what to do: a few hundred characters.
MESSAGE_LIMIT = 4096
#: What one CLI command may print for a two-checkpoint run, whatever a string in it holds.
OUTPUT_LIMIT = 32 * 1024

ANSI_HOLDER = "evil\x1b[2J\x1b]0;pwned\x07\r\nfake line\x00\x9b31m\u202egpj.exe"


# ---- helpers -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def plain_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide consoles without colours: any ESC in the output came from a hostile string."""
    monkeypatch.setattr(cli_module, "console", Console(width=400, emoji=False, color_system=None))
    monkeypatch.setattr(
        cli_module,
        "err_console",
        Console(width=400, stderr=True, emoji=False, color_system=None),
    )


def _state(seed: int = 0) -> tuple[sg.TrainState, torch.nn.Module]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 4)
    return sg.TrainState(model=model, extras={"epoch": 0, "note": "hi"}, rng=False), model


def _make_run(root: Any, steps: tuple[int, ...] = (1, 2)) -> Any:
    st, model = _state()
    ck = sg.Checkpointer(root, handle_signals=False, keep=sg.Keep(last=50))
    for s in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ck.save(st, s, metrics={"acc": 0.5 + s / 100})
    ck.close()
    return root


@pytest.fixture(scope="module")
def run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local run of two checkpoints (steps 1 and 2, each holding its own bytes)."""
    return _make_run(tmp_path_factory.mktemp("tmpl") / "run")


@pytest.fixture
def local_run(run_template: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_template, dst)
    return dst


_clients: dict[str, Any] = {}


def _boto(s3: Any) -> Any:
    """A boto3 client of the test server (made once: making one costs ~0.1 s of CPU)."""
    if s3.endpoint not in _clients:
        import boto3

        _clients[s3.endpoint] = boto3.client(
            "s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
            aws_secret_access_key=s3.secret_key, region_name=s3.region,
        )  # fmt: skip
    return _clients[s3.endpoint]


def _split(url: str) -> tuple[str, str]:
    bucket, prefix = url[len("s3://") :].split("/", 1)
    return bucket, prefix


def _plant(s3: Any, url: str, key: str, body: bytes) -> None:
    """Put ``body`` at ``<run>/<key>`` behind savegame's back (a hostile or broken writer)."""
    bucket, prefix = _split(url)
    _boto(s3).put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=body)


def _get(s3: Any, url: str, key: str) -> bytes | None:
    bucket, prefix = _split(url)
    try:
        return _boto(s3).get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
    except Exception:  # noqa: BLE001 - absent
        return None


def _upload_run(s3: Any, local: Path, url: str) -> None:
    """Copy a local run folder's files to ``url`` object by object (manifests included as
    they are, so an edited manifest reaches the store unchanged)."""
    bucket, prefix = _split(url)
    c = _boto(s3)
    for p in sorted(local.rglob("*")):
        if p.is_file() and p.name != layout.LOCK:
            c.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(local)}", Body=p.read_bytes())


def _resign(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a manifest with ``edit`` and re-sign it (its self-hash verifies)."""
    body = json.loads(path.read_bytes())
    body.pop("integrity")
    edit(body)
    body["integrity"] = {"algorithm": "xxh3-128", "hash": manifest._self_hash(body)}
    path.write_text(json.dumps(body))


def _assert_clean_message(msg: str, limit: int = MESSAGE_LIMIT) -> None:
    hit = _CONTROL.search(msg)
    assert hit is None, f"raw control character {hit.group()!r} in message: {msg[:300]!r}"
    assert len(msg) <= limit, f"message of {len(msg)} characters: {msg[:200]!r}..."


def _assert_clean_output(out: str, limit: int = OUTPUT_LIMIT) -> None:
    hit = _OUTPUT_CONTROL.search(out)
    assert hit is None, f"raw control character {hit.group()!r} printed: {out[:300]!r}"
    assert len(out) <= limit, f"{len(out)} characters printed: {out[:200]!r}..."


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in this (main) thread if the block runs past ``seconds``: a
    command that hangs on a hostile string fails its test instead of the whole file."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _cli(capsys: pytest.CaptureFixture[str], *argv: Any, limit: float = 20) -> tuple[int, str]:
    """The CLI in this process: its exit status and everything it printed. A raw exception
    escapes (what a user sees as a traceback) and fails the test, as does a command still
    running after ``limit`` seconds (a two-checkpoint run takes well under one)."""
    capsys.readouterr()
    with _deadline(limit):
        rc = cli_main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert rc in (0, 1, 2), rc
    return rc, cap.out + cap.err


def _open_or_typed(fn: Callable[[], Any]) -> Any:
    """``fn()``'s result, or the typed savegame error it raised (checked clean and bounded);
    any other exception fails the test."""
    try:
        return fn()
    except errors.CheckpointError as exc:
        _assert_clean_message(str(exc))
        return exc


def _open_restore_save(url: str, **kw: Any) -> int:
    """A training job resuming the run: open, restore, save one more step, close."""
    st, _ = _state(3)
    ck = sg.Checkpointer(url, handle_signals=False, keep=sg.Keep(last=50), **kw)
    try:
        step = int(ck.restore(st))
        ck.save(st, step + 1)
        return step
    finally:
        ck.close()


def _lease(holder: Any = "pid 1 on gpu-node-7", expires: Any = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"holder": holder, "ttl": 60.0, **extra}
    if expires is not None:
        body["expires"] = expires
    return json.dumps(body).encode()


def _in_an_hour() -> float:
    return time.time() + 3600


# ---- 1. the lease object of an object-store run -------------------------------------------------
# Expired: the run is free, by the docs' rule "not expired -> LockedError; expired -> taken
# over". Unreadable (not the JSON object savegame writes): it names no holder and no expiry;
# taking it over (what savegame does) or a clean LockedError are both acceptable, a crash not.
EXPIRED_LEASES = {
    "expired_long_ago": _lease(expires=1.0),
}
UNREADABLE_LEASES = {
    **EXPIRED_LEASES,
    "not_json": b"\x1b[2Jnot json at all",
    "json_array": b'["holder", 9999999999]',
    "non_utf8": b'{"holder": "\xff\xfe\x1b[2J", "expires": 9999999999}',
    "empty": b"",
    "expires_word": json.dumps({"holder": ANSI_HOLDER, "expires": "soon"}).encode(),
    "expires_nan": b'{"holder": "h", "expires": NaN}',
    "junk_8mb": os.urandom(1 << 20) * 8,
}


@pytest.fixture
def s3_run(s3_env: Any, s3_url: str, run_template: Path) -> str:
    """A run of two checkpoints on S3, no lease held (the template's objects, copied)."""
    _upload_run(s3_env, run_template, s3_url)
    return s3_url


@pytest.mark.parametrize("body", sorted(UNREADABLE_LEASES))
def test_unreadable_or_expired_lease_is_taken_over_or_refused_cleanly(
    s3_env: Any, s3_run: str, body: str, caplog: pytest.LogCaptureFixture
) -> None:
    planted = UNREADABLE_LEASES[body]
    _plant(s3_env, s3_run, layout.LOCK, planted)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="savegame"):
        got = _open_or_typed(lambda: _open_restore_save(s3_run))
    assert time.monotonic() - t0 < 30  # no wait for anything
    if body in EXPIRED_LEASES or not isinstance(got, errors.LockedError):
        assert got == 2  # taken over: restored step 2, saved step 3
        assert _get(s3_env, s3_run, layout.LOCK) is None  # ours, released at close
        taken = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
        assert taken, "the takeover of a dead writer's lease is logged"
    else:
        assert _get(s3_env, s3_run, layout.LOCK) == planted  # refused: left alone


@pytest.mark.parametrize(
    "expires",
    [b"Infinity", b'"1e300"', b"1" + b"0" * 400, b"1e20", b"1e17"],
    ids=["inf", "str_1e300", "int_10_400", "1e20", "1e17"],
)
def test_lease_expiry_out_of_range_is_a_typed_error_or_taken_over(
    s3_env: Any, s3_run: str, expires: bytes
) -> None:
    _plant(s3_env, s3_run, layout.LOCK, b'{"holder": "h", "ttl": 60, "expires": ' + expires + b"}")
    got = _open_or_typed(lambda: _open_restore_save(s3_run))
    assert got == 2 or isinstance(got, errors.LockedError)


@pytest.mark.parametrize("where", ["top_level", "in_holder"])
def test_deeply_nested_lease_is_a_typed_error_or_taken_over(
    s3_env: Any, s3_run: str, where: str
) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    body = deep if where == "top_level" else b'{"holder": ' + deep + b', "expires": 1e12}'
    _plant(s3_env, s3_run, layout.LOCK, body)
    got = _open_or_typed(lambda: _open_restore_save(s3_run))
    assert got == 2 or isinstance(got, errors.LockedError)


@pytest.mark.parametrize(
    "holder",
    [{"host": "\x1b[2J"}, None, ["a", "\x07"]],
    ids=["object", "null", "list"],
)
def test_live_lease_with_a_holder_that_is_not_a_string_is_locked_cleanly(
    s3_env: Any, s3_run: str, holder: Any
) -> None:
    planted = _lease(holder, _in_an_hour())
    _plant(s3_env, s3_run, layout.LOCK, planted)
    with pytest.raises(errors.LockedError) as exc_info:
        sg.Checkpointer(s3_run, handle_signals=False)
    _assert_clean_message(str(exc_info.value))
    assert _get(s3_env, s3_run, layout.LOCK) == planted  # a live lease is left alone


@pytest.mark.parametrize(
    "holder", [ANSI_HOLDER, "evil\udfff\ud800x"], ids=["escapes", "lone_surrogates"]
)
def test_live_lease_with_escape_sequences_in_its_holder(
    s3_env: Any, s3_run: str, holder: str
) -> None:
    planted = _lease(holder, _in_an_hour())
    _plant(s3_env, s3_run, layout.LOCK, planted)
    with pytest.raises(errors.LockedError) as exc_info:
        sg.Checkpointer(s3_run, handle_signals=False)
    msg = str(exc_info.value)
    assert "evil" in msg  # the holder is still named
    _assert_clean_message(msg)


@pytest.mark.parametrize("size", [100_000, 8 << 20], ids=["100KB", "8MB"])
def test_live_lease_with_a_huge_holder_gives_a_bounded_message(
    s3_env: Any, s3_run: str, size: int
) -> None:
    _plant(s3_env, s3_run, layout.LOCK, _lease("x" * size, _in_an_hour()))
    t0 = time.monotonic()
    with pytest.raises(errors.LockedError) as exc_info:
        sg.Checkpointer(s3_run, handle_signals=False)
    assert time.monotonic() - t0 < 30
    _assert_clean_message(str(exc_info.value))


def test_live_lease_still_locks_and_is_left_alone(s3_env: Any, s3_run: str) -> None:
    """The baseline the hostile cases are measured against: a live, well-formed lease."""
    planted = _lease("pid 4242 on gpu-node-7", _in_an_hour())
    _plant(s3_env, s3_run, layout.LOCK, planted)
    with pytest.raises(errors.LockedError, match="pid 4242 on gpu-node-7") as exc_info:
        sg.Checkpointer(s3_run, handle_signals=False)
    _assert_clean_message(str(exc_info.value))
    assert _get(s3_env, s3_run, layout.LOCK) == planted


def test_takeover_log_line_quotes_a_hostile_holder_cleanly(
    s3_env: Any, s3_run: str, caplog: pytest.LogCaptureFixture
) -> None:
    _plant(s3_env, s3_run, layout.LOCK, _lease(ANSI_HOLDER + "y" * (1 << 20), 1.0))
    with caplog.at_level(logging.WARNING, logger="savegame"):
        assert _open_restore_save(s3_run) == 2
    taken = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert taken
    for line in taken:
        _assert_clean_message(line)


def test_cli_prune_of_a_leased_s3_run_prints_the_holder_literally(
    s3_env: Any, s3_run: str, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = _lease(ANSI_HOLDER, _in_an_hour())
    _plant(s3_env, s3_run, layout.LOCK, planted)
    rc, out = _cli(capsys, "prune", s3_run, "--keep-last", "1")
    assert rc == 2
    _assert_clean_output(out)
    assert "evil\\x1b[2J" in out  # named, made visible
    assert _get(s3_env, s3_run, f"{STEP1}/{layout.MANIFEST}") is not None  # nothing deleted
    assert _get(s3_env, s3_run, layout.LOCK) == planted


def test_cli_prune_of_a_run_with_a_huge_lease_holder_prints_a_bounded_error_at_once(
    s3_env: Any, s3_run: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _plant(s3_env, s3_run, layout.LOCK, _lease("x" * 100_000, _in_an_hour()))
    rc, out = _cli(capsys, "prune", s3_run, "--keep-last", "1", limit=1.5)
    assert rc == 2
    _assert_clean_output(out)


@pytest.mark.parametrize("body", ["expires_inf", "nested"])
def test_cli_prune_of_a_run_with_a_broken_lease_exits_cleanly(
    s3_env: Any, s3_run: str, capsys: pytest.CaptureFixture[str], body: str
) -> None:
    raw = {
        "expires_inf": b'{"holder": "h", "expires": Infinity}',
        "nested": b"[" * 100_000 + b"]" * 100_000,
    }[body]
    _plant(s3_env, s3_run, layout.LOCK, raw)
    rc, out = _cli(capsys, "prune", s3_run, "--keep-last", "1")
    _assert_clean_output(out)


# ---- 2. the local run's .lock file ---------------------------------------------------------------
@pytest.fixture
def flocked(local_run: Path) -> Iterator[Callable[[bytes], None]]:
    """``flocked(body)``: the run's ``.lock`` holds ``body`` and is flock-ed by "another
    writer" (another open file description: flock conflicts even within one process)."""
    fds: list[int] = []

    def hold(body: bytes) -> None:
        path = local_run / layout.LOCK
        path.write_bytes(body)
        fd = os.open(path, os.O_RDWR)
        fds.append(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    try:
        yield hold
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize(
    "body",
    [
        b'{"pid": 1, "host": "h\xff", "since": 1}',
        json.dumps({"pid": 1, "host": "x" * 100_000, "since": 1.0}).encode(),
        b"not json",
        b'{"pid": 1}',
        b"[1, 2]",
    ],  # fmt: skip
    ids=["non_utf8", "100KB", "not_json", "partial", "array"],
)
def test_local_lock_with_an_unreadable_record_is_locked_cleanly(
    local_run: Path, flocked: Callable[[bytes], None], body: bytes
) -> None:
    flocked(body)
    with pytest.raises(errors.LockedError) as exc_info:
        sg.Checkpointer(local_run, handle_signals=False)
    _assert_clean_message(str(exc_info.value))


def test_local_lock_with_escape_sequences_in_its_host(
    local_run: Path, flocked: Callable[[bytes], None]
) -> None:
    flocked(json.dumps({"pid": 1, "host": ANSI_HOLDER, "since": 1.0}).encode())
    with pytest.raises(errors.LockedError) as exc_info:
        sg.Checkpointer(local_run, handle_signals=False)
    _assert_clean_message(str(exc_info.value))


@pytest.mark.parametrize(
    "body",
    [
        b'{"pid": 1, "host": "h", "since": Infinity}',
        b'{"pid": 1, "host": "h", "since": 1e300}',
        b'{"pid": 1, "host": "h", "since": 1' + b"0" * 400 + b"}",
        b"[" * 4000 + b"]" * 4000,
    ],  # fmt: skip
    ids=["since_inf", "since_1e300", "since_10_400", "nested"],
)
def test_local_lock_with_an_out_of_range_record_is_still_a_locked_error(
    local_run: Path, flocked: Callable[[bytes], None], body: bytes
) -> None:
    flocked(body)
    with pytest.raises(errors.LockedError) as exc_info:
        sg.Checkpointer(local_run, handle_signals=False)
    _assert_clean_message(str(exc_info.value))


def test_cli_prune_of_a_locked_local_run_with_a_broken_lock_record(
    local_run: Path, flocked: Callable[[bytes], None], capsys: pytest.CaptureFixture[str]
) -> None:
    flocked(b'{"pid": 1, "host": "h", "since": Infinity}')
    rc, out = _cli(capsys, "prune", local_run, "--keep-last", "1")
    assert rc == 2
    _assert_clean_output(out)


# ---- 3. run.json ---------------------------------------------------------------------------------
DAMAGED_RUN_FILES = {
    "not_json": b"\x1b[2J\x1b]0;t\x07 not json",
    "non_utf8": b'{"run_id": "\xff\xfe"}',
    "junk_8mb": os.urandom(1 << 20) * 8,
}


@pytest.mark.parametrize("body", sorted(DAMAGED_RUN_FILES))
def test_damaged_run_json_on_s3_is_a_typed_error_and_cli_reports_it(
    s3_env: Any, s3_run: str, capsys: pytest.CaptureFixture[str], body: str
) -> None:
    _plant(s3_env, s3_run, layout.RUN_FILE, DAMAGED_RUN_FILES[body])
    with pytest.raises(errors.FormatError) as exc_info:
        _open_restore_save(s3_run)
    _assert_clean_message(str(exc_info.value))
    rc, out = _cli(capsys, "ls", s3_run)
    assert rc == 0
    _assert_clean_output(out)
    rc, out = _cli(capsys, "verify", s3_run)
    assert rc == 1  # run.json damaged is a finding
    _assert_clean_output(out)
    rc, out = _cli(capsys, "prune", s3_run, "--keep-last", "1")
    assert rc == 2  # prune deletes nothing meanwhile
    _assert_clean_output(out)
    assert _get(s3_env, s3_run, f"{STEP1}/{layout.MANIFEST}") is not None


NESTED = b'{"run_id": "r", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("op", ["checkpointer", "ls", "verify", "show", "prune"])
def test_deeply_nested_run_json_local(
    local_run: Path, capsys: pytest.CaptureFixture[str], op: str
) -> None:
    (local_run / layout.RUN_FILE).write_bytes(NESTED)
    if op == "checkpointer":
        _open_or_typed(lambda: _open_restore_save(str(local_run)))
    else:
        extra = ["--keep-last", "1", "--dry-run"] if op == "prune" else []
        _, out = _cli(capsys, op, local_run, *extra)
        _assert_clean_output(out)


@pytest.mark.parametrize("op", ["checkpointer", "ls"])
def test_deeply_nested_run_json_s3(
    s3_env: Any, s3_run: str, capsys: pytest.CaptureFixture[str], op: str
) -> None:
    _plant(s3_env, s3_run, layout.RUN_FILE, NESTED)
    if op == "checkpointer":
        _open_or_typed(lambda: _open_restore_save(s3_run))
    else:
        _, out = _cli(capsys, op, s3_run)
        _assert_clean_output(out)


def _edit_run_file(local_run: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    rec = json.loads((local_run / layout.RUN_FILE).read_bytes())
    edit(rec)
    (local_run / layout.RUN_FILE).write_text(json.dumps(rec))


BIG_INT = 10**400


@pytest.mark.parametrize(
    ("op", "sessions"),
    [
        ("checkpointer", [{"start": BIG_INT, "end": None}]),
        ("checkpointer", [{"start": 1, "end": BIG_INT, "failed": True}]),
        ("ls", [{"start": 1, "end": BIG_INT, "failed": True}]),
        ("ls", [{"start": BIG_INT, "end": BIG_INT, "failed": True}]),
    ],
    ids=["open_start", "open_end", "ls_end", "ls_both"],
)
def test_run_json_session_times_beyond_a_double(
    local_run: Path, capsys: pytest.CaptureFixture[str], op: str, sessions: Any
) -> None:
    _edit_run_file(local_run, lambda r: r.update(sessions=sessions))
    if op == "checkpointer":
        assert _open_or_typed(lambda: _open_restore_save(str(local_run))) == 2
    else:
        rc, out = _cli(capsys, "ls", local_run)
        assert rc == 0
        _assert_clean_output(out)


@pytest.mark.parametrize(
    "sessions",
    [
        [{"start": float("nan"), "end": float("inf")}],
        [{"start": "\x1b[2J", "end": None}],
        "\x1b[2J" * 1000,
        [[1, 2]] * 10_000,
        [{"start": -1e308, "end": 1e308, "failed": "\x1b[2J"}],
        {"start": 1},
    ],
    ids=["nan_inf", "string", "not_a_list", "lists", "huge_floats", "object"],
)
def test_run_json_malformed_sessions_are_ignored(
    local_run: Path, capsys: pytest.CaptureFixture[str], sessions: Any
) -> None:
    _edit_run_file(local_run, lambda r: r.update(sessions=sessions))
    rc, out = _cli(capsys, "ls", local_run)
    assert rc == 0
    _assert_clean_output(out)
    assert _open_restore_save(str(local_run)) == 2


@pytest.mark.parametrize(
    "field",
    [
        {"run_id": "x\x1b[2J\x1b]0;t\x07\r\n" + "y" * 100_000},
        {"run_id": {"\x1b[2J": 1}},
        {"created": "yesterday\x1b[2J"},
        {"mtbf_s": BIG_INT, "interval_s": "\x1b[2J", "stall_s": [1]},
        {"extra\x1b[2J": "\x1b]0;t\x07" * 10_000},
    ],
    ids=["run_id_ansi_huge", "run_id_object", "created_word", "advice_fields", "unknown_field"],
)
def test_run_json_hostile_fields_do_not_break_the_cli_or_a_resume(
    local_run: Path, capsys: pytest.CaptureFixture[str], field: dict[str, Any]
) -> None:
    _edit_run_file(local_run, lambda r: r.update(field))
    for argv in (["ls", local_run], ["verify", local_run], ["show", local_run],
                 ["prune", local_run, "--keep-last", "50", "--dry-run"]):  # fmt: skip
        rc, out = _cli(capsys, *argv)
        assert rc in (0, 1), argv
        _assert_clean_output(out)
    got = _open_or_typed(lambda: _open_restore_save(str(local_run)))
    assert got == 2 or isinstance(got, errors.FormatError)


def test_run_json_huge_retention_rule_gives_a_bounded_message(
    local_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_run_file(local_run, lambda r: r.update(keep={"last": "z" * 100_000}))
    rc, out = _cli(capsys, "verify", local_run)
    assert rc in (1, 2)
    _assert_clean_output(out)


def test_run_json_retention_rule_with_escapes_is_reported_literally(
    local_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_run_file(local_run, lambda r: r.update(keep={"last\x1b[2J": 1, "every": "\x07"}))
    for argv in (
        ["ls", local_run],
        ["verify", local_run],
        ["prune", local_run, "--keep-last", "1"],
    ):
        rc, out = _cli(capsys, *argv)
        assert rc == 2, argv
        _assert_clean_output(out)
    assert (local_run / STEP1 / layout.MANIFEST).exists()  # prune deleted nothing


@pytest.mark.parametrize("size", [200, 500_000], ids=["ansi", "ansi_500KB"])
def test_push_into_a_run_whose_run_json_names_a_hostile_run_id(
    s3_env: Any, s3_url: str, local_run: Path, size: int
) -> None:
    rid = ("\x1b[2J\x1b]0;t\x07\r\n" + "r" * size)[:size]
    _plant(s3_env, s3_url, layout.RUN_FILE, json.dumps({"run_id": rid}).encode())
    with pytest.raises(errors.CheckpointError, match="holds another run") as exc_info:
        sg.push(local_run, s3_url)
    _assert_clean_message(str(exc_info.value))
    assert _get(s3_env, s3_url, f"{STEP1}/{layout.MANIFEST}") is None  # nothing written


def test_cli_push_into_a_run_with_a_huge_run_id_prints_a_bounded_error_at_once(
    s3_env: Any, s3_url: str, local_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _plant(
        s3_env, s3_url, layout.RUN_FILE, json.dumps({"run_id": "\x1b[2J" + "r" * 100_000}).encode()
    )
    rc, out = _cli(capsys, "push", "--no-progress", local_run, s3_url, limit=1.5)
    assert rc == 2
    _assert_clean_output(out)


def test_cache_refusal_quotes_a_hostile_remote_run_id_cleanly(
    s3_env: Any, s3_url: str, local_run: Path
) -> None:
    _plant(
        s3_env, s3_url, layout.RUN_FILE,
        json.dumps({"run_id": "\x1b[2J\x1b]0;t\x07\n" + "r" * 100_000}).encode(),
    )  # fmt: skip
    with pytest.raises(errors.CheckpointError, match="cache folder") as exc_info:
        sg.Checkpointer(s3_url, cache=local_run, handle_signals=False)
    _assert_clean_message(str(exc_info.value))
    assert (local_run / STEP2 / layout.MANIFEST).exists()  # the cache is left as it was


# ---- 4. LATEST -----------------------------------------------------------------------------------
HOSTILE_LATEST = {
    "ansi": b"\x1b[2J\x1b]0;t\x07step-000000000002\n",
    "non_utf8": b"step-\xff\xfe000000002",
    "dotdot": b"step-000000000001/../../../escape",
    "huge": b"step-" + b"0" * (4 << 20),
}


@pytest.mark.parametrize("body", sorted(HOSTILE_LATEST))
def test_hostile_latest_is_a_hint_only(
    s3_env: Any, s3_run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str
) -> None:
    _plant(s3_env, s3_run, layout.LATEST, HOSTILE_LATEST[body])
    assert _open_restore_save(s3_run) == 2  # saves step 3 (LATEST rewritten)
    assert _get(s3_env, s3_run, layout.LATEST) == b"step-000000000003\n"
    _plant(s3_env, s3_run, layout.LATEST, HOSTILE_LATEST[body])
    rc, out = _cli(capsys, "ls", s3_run)
    assert rc == 0
    _assert_clean_output(out)
    rc, out = _cli(capsys, "pull", "--no-progress", s3_run, tmp_path / "dest")
    assert rc == 0
    _assert_clean_output(out)
    assert sorted(p.name for p in (tmp_path / "dest").glob("step-*")) == [
        STEP1, STEP2, "step-000000000003"]  # fmt: skip
    assert not any("escape" in str(p) for p in tmp_path.rglob("*"))


# ---- 5. strings of a checkpoint's manifest -------------------------------------------------------
MANIFEST_EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "metric_names": lambda b: b.update(
        metrics={"acc\x1b[2J\x1b]0;t\x07\r\n": 0.5, "\u202eevil\x9b": 2.0, "a\x00b": 1.0}
    ),
    "extras_values": lambda b: b["trees"][0]["extras"].update(
        {"note": "\x1b[2J\x1b]0;t\x07\r\x9b", "big": "x\x1b[31m" * 200_000}
    ),
    "extras_keys": lambda b: b["trees"][0]["extras"].update(
        {"k\x1b]0;t\x07": 1, "nested\x1b[2J": {"a\r": {"b\u202e": "\x1b[31m"}}}
    ),
    "reason": lambda b: b["info"].update(reason="\x1b[2J\x1b]0;t\x07" + "r" * 200_000),
    "versions": lambda b: b.update(versions={"savegame": "\x1b[2J" + "v" * 200_000, "t\x07": "1"}),
    "free_info": lambda b: b["info"].update({"x\x1b[2J": "\x1b[2J" * 1000, "deep": [[[[[[1]]]]]]}),
    "advice_strings": lambda b: b["info"].update(
        advice={"stall_s": 1.0, "saves": "\x1b[2J", "save_s": [], "interval_s": {}, "mtbf_s": "x"}
    ),
    "advice_not_object": lambda b: b["info"].update(advice="\x1b[2J" * 1000),
    "advice_extremes": lambda b: b["info"].update(
        advice={
            "stall_s": 1e308,
            "saves": 1,
            "save_s": 1e308,
            "interval_s": 5e-324,
            "mtbf_s": 1e308,
        }
    ),
    "run_id_ansi": lambda b: b.update(run_id="\x1b[2J\x1b]0;t\x07\r\nother"),
    "created_extremes": lambda b: b.update(created=253402300799),
}


def _edited_run(local_run: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    _resign(local_run / STEP2 / layout.MANIFEST, edit)
    return local_run


@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_manifest_strings_never_reach_the_terminal_raw(
    local_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: str
) -> None:
    run = _edited_run(local_run, MANIFEST_EDITS[edit])
    for argv in (
        ["ls", run],
        ["ls", "--verify", run],
        ["show", run],
        ["show", run / STEP2],
        ["verify", run],
        ["diff", run / STEP1, run / STEP2, "--all"],
        ["push", "--no-progress", run, tmp_path / "copy"],
        ["prune", run, "--keep-last", "50", "--dry-run"],
    ):
        rc, out = _cli(capsys, *argv)
        assert rc in (0, 1), argv
        hit = _OUTPUT_CONTROL.search(out)
        assert hit is None, f"{argv[0]}: raw {hit.group()!r} printed"
    # and a resume is not disturbed by any of it
    assert _open_restore_save(str(run)) == 2


@pytest.mark.parametrize("edit", ["reason", "versions", "extras_values", "advice_extremes"])
def test_manifest_huge_values_print_bounded(
    local_run: Path, capsys: pytest.CaptureFixture[str], edit: str
) -> None:
    """Values the CLI shows cut (show's leaves at 80 characters) or not at all."""
    run = _edited_run(local_run, MANIFEST_EDITS[edit])
    for argv in (["ls", run], ["show", run], ["verify", run], ["diff", run / STEP1, run / STEP2]):
        _, out = _cli(capsys, *argv)
        _assert_clean_output(out)


@pytest.mark.parametrize("cmd", ["ls", "show"])
def test_manifest_huge_metric_name_prints_bounded(
    local_run: Path, capsys: pytest.CaptureFixture[str], cmd: str
) -> None:
    run = _edited_run(local_run, lambda b: b.update(metrics={"m\x1b[2J" * 50_000: 1.0}))
    rc, out = _cli(capsys, cmd, run)
    assert rc == 0
    _assert_clean_output(out)


def test_manifest_huge_extras_key_show_prints_bounded(
    local_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _edited_run(
        local_run, lambda b: b["trees"][0]["extras"].update({"k\x1b[2J" * 50_000: {"a": 1}})
    )
    rc, out = _cli(capsys, "show", run)
    assert rc == 0
    _assert_clean_output(out)


def test_verify_of_a_checkpoint_with_a_huge_run_id_prints_bounded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "shared"
    st, _ = _state()
    with sg.Checkpointer(run, handle_signals=False) as ck:
        ck.save(st, 1)
        ck.save(st, 2)  # nothing changed: step 2 refers to step 1's file
    assert any(
        manifest.is_ref(n)
        for n in json.loads((run / STEP2 / layout.MANIFEST).read_bytes())["files"]
    )
    _resign(run / STEP2 / layout.MANIFEST, lambda b: b.update(run_id="r" * 200_000))
    rc, out = _cli(capsys, "verify", run)
    assert rc == 1  # step 2 refers to bytes of step 1, of "another run"
    assert "another run" in out
    _assert_clean_output(out)


def test_s3_run_with_hostile_manifest_strings_cli_and_pull_with_progress(
    s3_env: Any, s3_url: str, local_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same strings read from S3: ls / show / verify of the URL and a pull with its
    progress bar on (stderr) print them only as visible escapes."""
    run = _edited_run(local_run, lambda b: [MANIFEST_EDITS[e](b) for e in (
        "metric_names", "extras_keys", "run_id_ansi")])  # fmt: skip
    _upload_run(s3_env, run, s3_url)
    _plant(s3_env, s3_url, layout.LATEST, HOSTILE_LATEST["ansi"])
    for argv in (["ls", s3_url], ["show", s3_url], ["verify", s3_url],
                 ["diff", f"{s3_url}/{STEP1}", f"{s3_url}/{STEP2}"]):  # fmt: skip
        rc, out = _cli(capsys, *argv)
        assert rc in (0, 1), argv
        _assert_clean_output(out)
    capsys.readouterr()
    rep = sg.pull(s3_url, tmp_path / "dest", progress=True)
    cap = capsys.readouterr()
    _assert_clean_output(cap.out + cap.err)
    assert sorted(rep.copied) == [1, 2]
    torch.manual_seed(9)
    extras: dict[str, Any] = {"epoch": 0, "note": ""}
    st = sg.TrainState(model=torch.nn.Linear(4, 4), extras=extras, rng=False)
    ck = sg.Checkpointer(tmp_path / "dest", handle_signals=False)
    try:
        assert ck.restore(st) == 2
    finally:
        ck.close()
    assert extras["note"] == "hi"


# ---- 6. the marker object of a save in progress (``.tmp-step-…``) ----------------------------------
MARKER = ".tmp-step-000000000003-deadbeef"
HOSTILE_MARKERS = {
    "writer_ansi": json.dumps({"final": "step-000000000003", "dest": "step-000000000003",
                               "writer": ANSI_HOLDER + "w" * 100_000, "created": "\x1b[2J"}).encode(),
    "dest_not_str": json.dumps({"final": 3, "dest": {"x": "\x1b[2J"}, "deleting": "yes"}).encode(),
    "not_json": b"\x1b[2J\xff\xfe",
    "nested": b"[" * 100_000 + b"]" * 100_000,
    "nested_in_dest": b'{"dest": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        k
        for k in sorted(HOSTILE_MARKERS)
    ],
)  # fmt: skip
def test_hostile_marker_object_leaves_the_run_listable_and_resumable(
    s3_env: Any, s3_run: str, capsys: pytest.CaptureFixture[str], body: str
) -> None:
    _plant(s3_env, s3_run, MARKER, HOSTILE_MARKERS[body])
    rc, out = _cli(capsys, "ls", s3_run)
    assert rc == 0
    _assert_clean_output(out)
    rc, out = _cli(capsys, "verify", s3_run)
    assert rc in (0, 1)
    _assert_clean_output(out)
    got = _open_or_typed(lambda: _open_restore_save(s3_run))
    assert got == 2
