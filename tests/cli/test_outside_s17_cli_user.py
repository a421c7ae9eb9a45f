"""Outside review (s17, R7): the ``savegame`` command line as a new user meets it.

Every command runs the way the README runs it: the ``savegame`` console script of this
environment (``python -m savegame`` where the script is missing), in a child process, with its
output piped (no terminal) unless a test gives it one. The runs are real: small models trained
a few steps with ``sg.Checkpointer`` (metrics, incremental saves, a killed save), then copied,
moved, linked and addressed through ``file://`` URLs. What a user relies on is what the README's
"Command line" section and each command's ``--help`` promise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import torch

import savegame as sg

README = Path(__file__).resolve().parents[2] / "README.md"
_SCRIPT = Path(sys.executable).with_name("savegame")
_CMD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "savegame"]
# Variables that change how rich renders: a user's plain pipe has none of them.
_RENDER_VARS = ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "TERM", "TTY_COMPATIBLE", "CLICOLOR")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RENDER_VARS}
    env.update(extra or {})
    return env


def cli(
    *args: object, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``savegame ARGS`` as typed in a shell, stdout and stderr captured (a pipe, no terminal)."""
    return subprocess.run(
        [*_CMD, *map(str, args)], cwd=cwd, env=_env(env), capture_output=True, text=True,
        encoding="utf-8", errors="backslashreplace", timeout=timeout,
    )  # fmt: skip


def _no_traceback(p: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    assert "Exception ignored" not in p.stderr, p.stderr


def _train(root: Path, steps: int, keep: sg.Keep, *, frozen_base: bool = False) -> None:
    """A small model trained ``steps`` optimizer steps, a checkpoint after each, with metrics."""
    torch.manual_seed(0)
    base, head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 2)
    if frozen_base:  # fine-tuning a frozen base: incremental saves share its bytes
        for p in base.parameters():
            p.requires_grad_(False)
    model = torch.nn.Sequential(base, torch.nn.ReLU(), head)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    extras = {"epoch": 0}
    state = sg.TrainState(model=model, optimizer=opt, extras=extras)
    with sg.Checkpointer(root, save=sg.Every(steps=1), keep=keep, handle_signals=False) as ck:
        for s in range(1, steps + 1):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            extras["epoch"] = s // 4
            ck.step(state, s, metrics={"val_acc": 0.5 + (s % 4) / 10, "loss": loss.item()})


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*"))


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` (hidden ones too) with its size and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == ".lock":
            continue  # a lock file's mtime changes when a command takes the lock
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/exp1: 8 steps, Keep(last=3, best=1 by val_acc max): steps 3, 6, 7, 8 kept."""
    root = tmp_path_factory.mktemp("user") / "runs" / "exp1"
    _train(root, 8, sg.Keep(last=3, best=1, monitor="val_acc", mode="max"))
    assert _steps(root) == [3, 6, 7, 8]
    return root


# ---- help and usage ------------------------------------------------------------------------------
def _readme_usage() -> dict[str, str]:
    """The README's "Command line" block: command -> its usage line."""
    text = README.read_text(encoding="utf-8")
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    lines = [ln for ln in block.splitlines() if ln.startswith("savegame ")]
    return {ln.split()[1]: ln for ln in lines}


def test_every_subcommand_has_help_matching_the_readme_usage_line() -> None:
    usage = _readme_usage()
    assert set(usage) == {
        "ls",
        "show",
        "verify",
        "prune",
        "convert",
        "diff",
        "plot",
        "push",
        "pull",
        "demo",
    }
    top = cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in usage)
    for command, line in usage.items():
        h = cli(command, "--help")
        assert h.returncode == 0, (command, h.stderr)
        assert h.stdout.startswith(f"usage: savegame {command}"), h.stdout
        for flag in re.findall(r"--[a-z][a-z-]*", line):  # every option the README names
            assert flag in h.stdout, (command, flag, h.stdout)
        _no_traceback(h)


@pytest.mark.parametrize(
    "argv, says",
    [
        ([], "required: command"),
        (["lss", "x"], "invalid choice: 'lss'"),
        (["ls", "--json", "x"], "unrecognized arguments: --json"),
        (["verify"], "required: path"),
        (["convert", "a", "b"], "required: --to"),
        (["prune", "x", "--keep-last", "three"], "invalid int value: 'three'"),
        (["diff", "a"], "required: b"),
    ],
)
def test_usage_mistakes_exit_2_with_a_message_and_no_traceback(argv: list[str], says: str) -> None:
    p = cli(*argv)
    assert p.returncode == 2 and says in p.stderr and p.stdout == ""
    _no_traceback(p)


def test_bad_values_and_missing_paths_exit_2_on_stderr_only(run: Path, tmp_path: Path) -> None:
    for argv, says in [
        (["prune", run, "--keep-last", "0", "--dry-run"], "keep at least the newest"),
        (["ls", tmp_path / "no such run"], "does not exist"),
        (["show", tmp_path / "nothing.pt"], "nothing.pt"),
        # ranking by a metric whose direction nobody gave: refused, never guessed
        (["prune", run, "--keep-best", "1", "--monitor", "loss", "--dry-run"], "--mode"),
    ]:
        p = cli(*argv)
        assert p.returncode == 2, (argv, p.stdout, p.stderr)
        assert p.stderr.startswith("error: ") and says in p.stderr, (argv, p.stderr)
        _no_traceback(p)
    assert _steps(run) == [3, 6, 7, 8]


def test_a_bad_mtbf_is_refused_before_anything_is_listed(run: Path) -> None:
    p = cli("ls", run, "--mtbf", "0")
    assert p.returncode == 2 and "mtbf" in p.stderr
    assert p.stdout == "", p.stdout  # a script capturing stdout must not get a table


# ---- pipes, encodings, terminals -----------------------------------------------------------------
def _closed_pipe_run(*args: object) -> tuple[int, str]:
    """``savegame ARGS`` writing into a pipe nobody reads any more (``| head -0``)."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the command writes its first line
    try:
        p = subprocess.run(
            [*_CMD, *map(str, args)], stdout=w, stderr=subprocess.PIPE, env=_env(), timeout=180
        )
    finally:
        os.close(w)
    return p.returncode, p.stderr.decode("utf-8", "backslashreplace")


def test_output_into_a_closed_pipe_ends_quietly(run: Path) -> None:
    # `savegame ls RUN | head -1`: no traceback, no "Exception ignored ... BrokenPipeError".
    rc, err = _closed_pipe_run("ls", run)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, (
        err
    )
    assert rc != 2, err  # not "bad input or a savegame error"


def test_verify_into_a_closed_pipe_never_says_it_found_damage(run: Path) -> None:
    # Under `set -o pipefail`, `savegame verify RUN | head -1` must not read as "damaged".
    rc, err = _closed_pipe_run("verify", run)
    assert rc in (0, 141, -signal.SIGPIPE), (rc, err)


def test_piped_output_has_no_terminal_escapes_and_no_color_and_dumb_are_honoured(
    tmp_path: Path,
) -> None:
    import pty

    from safetensors.torch import save_file

    weights = tmp_path / "weights.safetensors"  # a foreign file: `verify` needs no torch import
    save_file({"w": torch.ones(3)}, str(weights))
    piped = cli("verify", weights)
    assert piped.returncode == 0 and "\x1b" not in piped.stdout + piped.stderr

    def on_a_terminal(extra: dict[str, str]) -> bytes:
        m, s = pty.openpty()
        p = subprocess.Popen(
            [*_CMD, "verify", str(weights)], stdin=s, stdout=s, stderr=s, env=_env(extra)
        )
        os.close(s)
        out = b""
        while True:
            try:
                chunk = os.read(m, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        assert p.wait(timeout=120) == 0
        os.close(m)
        return out

    colours = re.compile(rb"\x1b\[[0-9;]*(?:3[0-9]|9[0-7]|38;[0-9;]+)m")
    assert colours.search(on_a_terminal({"TERM": "xterm-256color"}))  # colour on a terminal
    assert not colours.search(on_a_terminal({"TERM": "xterm-256color", "NO_COLOR": "1"}))
    assert b"\x1b[" not in on_a_terminal({"TERM": "dumb"})


def test_ls_works_on_an_ascii_only_output(run: Path) -> None:
    p = cli("ls", run, env={"PYTHONIOENCODING": "ascii"})
    assert p.returncode == 0, p.stderr
    assert "(4 checkpoints" in p.stdout


def test_a_unicode_path_on_an_ascii_only_output_is_escaped_not_refused(
    run: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "модель ü"
    shutil.copytree(run, moved)
    p = cli("show", moved, env={"PYTHONIOENCODING": "ascii"})
    assert p.returncode == 0, p.stderr
    assert "step-000000000008" in p.stdout


def test_ls_into_a_pipe_shows_every_metric_value_whole(run: Path) -> None:
    p = cli("ls", run)
    assert p.returncode == 0
    with sg.open(run / "step-000000000003") as r:
        best = r.metadata()["metrics"]["val_acc"]
    assert f"val_acc={best:.4g}" in p.stdout, p.stdout


def test_ls_at_200_columns_shows_one_row_per_checkpoint_with_whole_values(run: Path) -> None:
    p = cli("ls", run, env={"COLUMNS": "200"})
    assert p.returncode == 0
    rows = [ln for ln in p.stdout.splitlines() if re.match(r"^│\s+\d+ │", ln) and "yes" in ln]
    assert [int(r.split("│")[1]) for r in rows] == [3, 6, 7, 8]
    assert "val_acc=0.8" in rows[0] and "best" in rows[0] and "\u2026" not in p.stdout


# ---- paths -----------------------------------------------------------------------------------------
@pytest.mark.slow  # CI under 20 minutes
def test_a_copied_moved_and_linked_run_is_verified_under_every_spelling_of_its_path(
    run: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "my runs" / "模型 ünï"  # spaces and non-ASCII letters
    shutil.copytree(run, moved)
    dash = tmp_path / "-exp1"  # a leading dash: `--` ends the options, as with every tool
    moved.rename(dash)
    (tmp_path / "link").symlink_to(dash)
    shutil.copytree(dash, moved)
    url = "file://" + "/".join(quote(part) for part in str(moved).split("/"))
    for argv, cwd in [
        (["verify", "--", "-exp1"], tmp_path),
        (["verify", "link/"], tmp_path),  # a symlink to a run, with a trailing slash
        (["verify", "."], moved),  # the current folder is the run
        (["verify", url], None),  # %20 and percent-encoded UTF-8
    ]:
        p = cli(*argv, cwd=cwd)
        assert p.returncode == 0, (argv, p.stdout, p.stderr)
        assert "all 4 verified" in p.stdout, (argv, p.stdout)
    shown = cli("show", moved, env={"COLUMNS": "200"})
    assert shown.returncode == 0 and str(moved) in shown.stdout  # the path as given, literally


def test_a_checkpoint_a_file_in_it_and_its_manifest_are_told_apart(run: Path) -> None:
    ckpt = run / "step-000000000008"
    ls = cli("ls", ckpt)
    assert ls.returncode == 2 and "one checkpoint, not a run folder" in ls.stderr
    assert f"savegame ls {run}" in ls.stderr  # says what to run instead
    prune = cli("prune", ckpt)
    assert prune.returncode == 2 and f"savegame prune {run}" in prune.stderr
    man = cli("show", ckpt / "manifest.json")
    assert man.returncode == 2 and "savegame checkpoint folders" in man.stderr
    _no_traceback(man)
    rank = cli("verify", ckpt / "rank-00000.safetensors")  # an intact file inside a checkpoint
    assert rank.returncode == 0, rank.stderr
    assert _steps(run) == [3, 6, 7, 8]


def test_verify_of_a_damaged_file_inside_a_checkpoint_does_not_say_ok(
    run: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    f = copy / "step-000000000008" / "rank-00000.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the last tensor's data
    f.write_bytes(bytes(data))
    assert cli("verify", copy / "step-000000000008").returncode == 1
    p = cli("verify", f)
    assert p.returncode == 1, p.stdout


def test_a_file_url_with_a_relative_path_never_means_the_current_folder(run: Path) -> None:
    # cwd is runs/ (not a run); the user means runs/exp1.
    p = cli("ls", "file://exp1", cwd=run.parent)
    assert "no checkpoints yet" not in p.stdout, p.stdout
    assert p.returncode == 2 or "(4 checkpoints" in p.stdout, (p.stdout, p.stderr)


# ---- agreement with the Python API -----------------------------------------------------------------
@pytest.mark.slow  # CI under 20 minutes
def test_show_diff_and_convert_agree_with_the_python_api(run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    newest = run / "step-000000000008"
    with sg.open(newest) as r:
        names = r.keys()
        infos = {k: r.info(k) for k in names}
    show = cli("show", run, env={"COLUMNS": "200"})  # a run means its newest valid checkpoint
    assert show.returncode == 0
    assert show.stdout.splitlines()[0].startswith(f"{newest} (savegame)  step 8")
    assert f"{len(names)} tensors" in show.stdout
    for k, i in infos.items():
        leaf = k.rsplit("/", 1)[-1]
        assert f"{leaf}: {i.dtype}{list(i.shape)}" in show.stdout, k

    res = sg.diff(run / "step-000000000003", newest)
    d = cli("diff", run / "step-000000000003", newest)
    assert d.returncode == (0 if res.equal else 1)
    differ = len([n for n in res.max_abs_diff if n not in set(res.identical)])
    assert (
        f"{len(res.identical)} identical, {differ} differ in value, {len(res.changed)} differ in "
        f"dtype/shape, {len(res.removed)} only in A, {len(res.added)} only in B"
    ) in " ".join(d.stdout.split())
    same = cli("diff", run, newest)  # the run folder and its newest checkpoint: equal
    assert same.returncode == 0, same.stdout

    out = tmp_path / "model.safetensors"
    c = cli("convert", run, out, "--to", "safetensors")
    assert c.returncode == 0 and f"{len(names)} tensors" in c.stdout
    got = load_file(out)
    with sg.open(newest) as r:
        assert set(got) == set(names)
        for k in names:
            assert torch.equal(got[k], r.read(k)), k
    before = out.read_bytes()
    again = cli("convert", run / "step-000000000003", out, "--to", "safetensors")  # same target
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert out.read_bytes() == before  # an existing output is never damaged


def test_a_failed_convert_onto_the_current_folder_leaves_nothing_behind(
    run: Path, tmp_path: Path
) -> None:
    here = tmp_path / "project"
    here.mkdir()
    (here / "train.py").write_text("print('mine')\n")
    p = cli("convert", run, ".", "--to", "savegame", "--overwrite", cwd=here)
    assert p.returncode == 2
    _no_traceback(p)
    assert sorted(x.name for x in here.iterdir()) == ["train.py"]


def test_convert_overwrite_never_replaces_a_run_a_training_holds(run: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    _train(live, 3, sg.Keep(last=3))
    ck = sg.Checkpointer(live, handle_signals=False)  # a training is running on it
    try:
        assert cli("prune", live, "--keep-last", "1").returncode == 2  # prune respects the lock
        p = cli("convert", run / "step-000000000003", live, "--to", "savegame", "--overwrite")
        steps_after = _steps(live)
        assert p.returncode == 2, p.stdout
        assert steps_after == [1, 2, 3]
    finally:
        ck.close()


# ---- prune -------------------------------------------------------------------------------------------
@pytest.mark.slow  # CI under 20 minutes
def test_prune_dry_run_changes_nothing_and_prune_keeps_newest_and_shared_bytes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ft"
    _train(root, 6, sg.Keep(last=10), frozen_base=True)
    assert _steps(root) == [1, 2, 3, 4, 5, 6]
    newest_before = sg.load(root / "step-000000000006")
    snapshot = _tree(root)

    dry = cli("prune", root, "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0 and "dry run: 5 would be deleted" in dry.stdout
    assert _tree(root) == snapshot  # nothing changed, not even a timestamp

    first = cli("prune", root, "--keep-last", "1")
    assert first.returncode == 0 and "deleted 5 checkpoints" in first.stdout
    assert _steps(root) == [6]  # the newest stays
    second = cli("prune", root, "--keep-last", "1")  # the same command again: a no-op
    assert second.returncode == 0 and "deleted 0 checkpoints" in second.stdout
    assert _steps(root) == [6]

    v = cli("verify", root)  # every byte step 6 shares with deleted step 1 is still there
    assert v.returncode == 0 and "all 1 verified" in v.stdout, v.stdout
    after = sg.load(root / "step-000000000006")
    flat_a, flat_b = _flatten(newest_before), _flatten(after)
    assert flat_a.keys() == flat_b.keys()
    for k, a in flat_a.items():
        b = flat_b[k]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
        elif hasattr(a, "shape"):  # numpy's RNG state
            assert np.array_equal(a, b), k
        else:
            assert a == b, k


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): tree}


# ---- a killed save ---------------------------------------------------------------------------------
def test_a_killed_save_leaves_a_temp_folder_that_ls_verify_and_prune_treat_as_such(
    tmp_path: Path,
) -> None:
    from savegame.storage.faulty import FaultyStore
    from savegame.storage.local import LocalStore

    root = tmp_path / "killed"
    root.mkdir()
    model = torch.nn.Linear(4, 2)
    state = sg.TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    store = FaultyStore(LocalStore(root), {"commit.publish": 3}, crash=True)  # dies before step 3
    with pytest.raises(BaseException):  # noqa: B017 - whatever the simulated crash raises
        with sg.Checkpointer(
            store, save=sg.Every(steps=1), keep=sg.Keep(last=5), handle_signals=False
        ) as ck:
            for s in range(1, 5):
                ck.step(state, s)
    temp = [p.name for p in root.iterdir() if p.name.startswith(".tmp-step-000000000003")]
    assert len(temp) == 1 and _steps(root) == [1, 2]

    ls = cli("ls", root, env={"COLUMNS": "200"})
    assert ls.returncode == 0 and "1 leftover temp folder" in ls.stdout and temp[0] in ls.stdout
    v = cli("verify", root)
    assert v.returncode == 0 and "leftover" in v.stdout and "all 2 verified" in v.stdout
    pr = cli("prune", root, "--keep-last", "1")
    assert pr.returncode == 0 and _steps(root) == [2]
    assert (root / temp[0]).is_dir()  # prune never touches temp folders


# ---- a long run ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ls_of_a_run_with_300_checkpoints_is_fast_and_sorted_by_step(tmp_path: Path) -> None:
    from unittest import mock

    root = tmp_path / "long"
    extras = {"w": torch.zeros(2)}
    state = sg.TrainState(extras=extras)
    with mock.patch("os.fsync"):  # building the fixture only: the command reads real files
        with sg.Checkpointer(
            root, save=sg.Every(steps=1), keep=sg.Keep(last=1000), handle_signals=False
        ) as ck:
            for s in range(1, 306):
                extras["w"] += 1
                ck.step(state, s, metrics={"loss": 1.0 / s})
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, rich"], check=True, env=_env())
    baseline = time.perf_counter() - t0  # the interpreter and torch import: not ls's own work
    t0 = time.perf_counter()
    p = cli("ls", root, env={"COLUMNS": "200"})
    took = time.perf_counter() - t0
    assert p.returncode == 0 and "(305 checkpoints)" in p.stdout
    steps = [int(m) for m in re.findall(r"^│\s+(\d+) │", p.stdout, flags=re.M)]
    assert steps == list(range(1, 306))  # 9 before 10, 99 before 100
    assert took - baseline < 3.0, (took, baseline)


# ---- Ctrl-C ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A run with one ~200 MB checkpoint: long enough to interrupt a command reading it."""
    root = tmp_path_factory.mktemp("big") / "big"
    torch.manual_seed(0)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(1024, 1024)) for _ in range(50)])
    with sg.Checkpointer(root, handle_signals=False) as ck:
        ck.save(sg.TrainState(model=model), 1)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _interrupt_when_reading(
    argv: Sequence[object], source: Path, cwd: Path
) -> tuple[int, float, str]:
    """Start ``savegame ARGV``, send SIGINT (Ctrl-C) once it has ``source`` open, and return
    its exit status, the seconds it took to exit after the signal, and its stderr."""
    p = subprocess.Popen(
        [*_CMD, *map(str, argv)],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    target = str(source.resolve())
    while time.monotonic() < deadline and p.poll() is None:
        try:
            fds = [os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{p.pid}/fd")]
        except OSError:
            fds = []
        if any(f.startswith(target) for f in fds):
            break
        time.sleep(0.01)
    assert p.poll() is None, "the command ended before it could be interrupted"
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    return p.returncode, time.monotonic() - sent, err.decode("utf-8", "backslashreplace")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["verify", "convert", "push"])
def test_ctrl_c_during_a_long_command_exits_130_promptly_without_partial_output(
    big_run: Path, tmp_path: Path, command: str
) -> None:
    source = big_run / "step-000000000001" / "rank-00000.safetensors"
    argv: list[object] = {
        "verify": ["verify", big_run],
        "convert": ["convert", big_run, "model.safetensors", "--to", "safetensors"],
        "push": ["push", big_run, "copy", "--no-progress"],
    }[command]
    rc, took, err = _interrupt_when_reading(argv, source, tmp_path)
    assert rc in (130, -signal.SIGINT), (rc, err)
    assert took < 5, took
    assert "Traceback" not in err, err
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    if command == "convert":
        assert visible == [], visible  # no partial model.safetensors, no temp file
    if command == "push":  # a hidden temp folder at most: no step-… a reader would take
        assert _steps(tmp_path / "copy") == [] if (tmp_path / "copy").exists() else True
        again = cli("push", big_run, tmp_path / "copy", "--no-progress")  # re-run: continues
        assert again.returncode == 0 and "all verified" in again.stdout, again.stdout
    assert json.loads((big_run / "run.json").read_text())  # the source is untouched
