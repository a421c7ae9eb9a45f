"""Outside review (R6, session 17): saves that fail, async saves, and unusual tensors.

Written from README.md, docs/async.md, docs/format.md and docs/resume.md only, through the public
API (``import savegame as sg``; ``savegame.storage`` stores as docs/storage.md shows them). The
promises under test:

- a failed operation never loses or damages earlier checkpoints, leaves nothing half-written
  visible, and the next save after the problem is fixed works;
- errors are typed, actionable and raised on the caller's thread (async: at the next
  step/save/close, exactly once);
- an async save holds the values at save time, whatever is mutated after the call returns;
- a round trip save -> restore into fresh objects is bit-exact, and what cannot be stored is
  refused with a typed error naming the offending key.

Child processes: tests/_outside_s17/ (a limited file size, a read-only folder, the process
exiting or being signalled or SIGKILLed with a save in flight).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame as sg
from savegame.storage.faulty import FaultyStore
from savegame.storage.local import LocalStore

HERE = Path(__file__).resolve().parent
CHILDREN = HERE / "_outside_s17"
sys.path.insert(0, str(CHILDREN))
from async_child import SlowCommitStore  # noqa: E402

MODES = ["sync", "async"]


# ---- helpers --------------------------------------------------------------------------------------
def bits(t: torch.Tensor) -> bytes:
    """The tensor's element bytes in logical order (NaN payloads and -0.0 included)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    c = t.contiguous().reshape(-1)
    if c.numel() == 0:
        return b""
    return c.view(torch.uint8).numpy().tobytes()


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert isinstance(b, torch.Tensor), what
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert tuple(a.shape) == tuple(b.shape), (what, a.shape, b.shape)
    assert bits(a) == bits(b), what


def verify_cli(root: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "savegame", "verify", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def step_dirs(root: Path | str) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("step-"))


def temp_dirs(root: Path | str) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith(".tmp"))


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore_fresh(root: Path | str, build: Any) -> tuple[int, Any]:
    """Restore ``root`` into freshly built objects (``build()`` -> (TrainState, payload))."""
    state, payload = build()
    with sg.Checkpointer(root) as ck:
        step = ck.restore(state)
    return step, payload


def run_child(args: list[str], *, prefix: list[str] | None = None, timeout: float = 120) -> Any:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [*(prefix or []), sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


class GatedStore(LocalStore):
    """A local folder whose background work (creating the staging folder) waits for ``gate``:
    the writer is held back while the test mutates the live state."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.begin_threads: list[str] = []

    def begin(self, name, final=None):  # type: ignore[no-untyped-def]
        self.begin_threads.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            assert self.gate.wait(30), "test never opened the gate"
        return super().begin(name, final)


# ---- 1. saves that fail ---------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr!r}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("mode", MODES)
def test_disk_full_fails_typed_keeps_earlier_and_next_save_works(
    small_tmpfs: Path, mode: str
) -> None:
    root = small_tmpfs / "run"
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    extras: dict[str, Any] = {"blob": torch.zeros(4)}
    state = sg.TrainState(model=model, extras=extras)
    with sg.Checkpointer(root, keep=sg.Keep(last=10), async_save=(mode == "async")) as ck:
        ck.save(state, 1)
        saved1 = model_state(model)
        extras["blob"] = torch.randn(256 * 1024)  # 1 MiB: more than the disk holds
        if mode == "sync":
            with pytest.raises(sg.StorageError) as info:
                ck.save(state, 2)
        else:
            handle = ck.save_async(state, 2)  # returns once staged; the write fails behind
            assert handle is not None
            with pytest.raises(sg.StorageError) as info:
                handle.result(timeout=60)
            ck.step(state, 2)  # delivered through result(): not raised a second time
        err = info.value
        assert isinstance(err, OSError) and isinstance(err, sg.CheckpointError)
        assert "space" in str(err).lower() or "full" in str(err).lower()
        # nothing half-written is visible; the earlier checkpoint still verifies
        assert step_dirs(root) == ["step-000000000001"]
        assert temp_dirs(root) == []
        v = verify_cli(root)
        assert v.returncode == 0, v.stdout + v.stderr
        # the problem is fixed: the next save works
        extras["blob"] = torch.arange(4.0)
        with torch.no_grad():
            model.weight.add_(1)
        saved3 = model_state(model)
        ck.save(state, 3)
    assert step_dirs(root) == ["step-000000000001", "step-000000000003"]
    assert verify_cli(root).returncode == 0

    def build():  # type: ignore[no-untyped-def]
        m = torch.nn.Linear(16, 16)
        ex: dict[str, Any] = {}
        return sg.TrainState(model=m, extras=ex), (m, ex)

    step, (m, ex) = restore_fresh(root, build)
    assert step == 3
    for k, v in saved3.items():
        assert_same_tensor(v, m.state_dict()[k], k)
    assert_same_tensor(torch.arange(4.0), ex["blob"])
    assert saved1  # (step 1 is still on disk, verified above)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_file_size_limit_fails_typed_and_recovers(tmp_path: Path, mode: str) -> None:
    """`ulimit -f` (RLIMIT_FSIZE) ends a write early: the README says it fails the save with
    StorageError; after the limit is lifted the next save works."""
    root = tmp_path / "run"
    r = run_child([str(CHILDREN / "fail_child.py"), str(root), mode, "fsize"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    failures = [c for c in out["calls"] if "error" in c]
    assert failures, out
    first = failures[0]
    assert first["error"] == "StorageError" and first["checkpoint_error"] and first["oserror"], (
        first
    )
    assert "close_error" not in out, out
    assert "after_fix" in out, out
    assert not any(n.startswith(".tmp") for n in out["listing"]), out
    names = step_dirs(root)
    assert names[0] == "step-000000000001" and names[-1] == "step-000000000004", names
    assert verify_cli(root).returncode == 0
    m = torch.nn.Linear(8, 8)
    ex: dict[str, Any] = {}
    with sg.Checkpointer(root) as ck:
        assert ck.restore(sg.TrainState(model=m, extras=ex)) == 4
    assert m.weight.detach().flatten().tolist() == out["weight"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_run_folder_made_read_only_mid_run(tmp_path: Path, mode: str) -> None:
    prefix: list[str] = []
    if os.geteuid() == 0:  # root ignores mode bits: drop every capability in the child
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root without setpriv: cannot make a folder read-only for the child")
        prefix = [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--"]
    root = tmp_path / "run"
    r = run_child([str(CHILDREN / "fail_child.py"), str(root), mode, "readonly"], prefix=prefix)
    os.chmod(root, 0o755)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    failures = [c for c in out["calls"] if "error" in c]
    assert failures, out
    first = failures[0]
    assert first["checkpoint_error"] and first["error"] in ("StorageError", "AccessDeniedError"), (
        first
    )
    assert "permission" in first["message"].lower() or "writable" in first["message"].lower(), first
    # nothing half-written in the read-only folder; the earlier checkpoint is untouched
    assert all(c["listing"].count("step-000000000001") == 1 for c in out["calls"])
    assert "after_fix" in out, out
    assert "close_error" not in out, out
    assert not any(n.startswith(".tmp") for n in out["listing"]), out
    assert verify_cli(root).returncode == 0
    assert step_dirs(root)[-1] == "step-000000000004"


@pytest.mark.parametrize("mode", MODES)
def test_run_folder_renamed_mid_run_then_put_back(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "run"
    moved = tmp_path / "moved"
    model = torch.nn.Linear(4, 4)
    state = sg.TrainState(model=model)
    with sg.Checkpointer(root, save=sg.Every(steps=1), async_save=(mode == "async")) as ck:
        ck.save(state, 1)
        os.rename(root, moved)
        with pytest.raises(sg.StorageError) as info:
            ck.step(state, 2)
            ck.wait()
        assert info.value.step == 2
        assert str(root) in str(info.value) or "run" in str(info.value)
        assert not root.exists() or step_dirs(root) == []
        assert step_dirs(moved) == ["step-000000000001"] and temp_dirs(moved) == []
        os.rename(moved, root)
        ck.save(state, 3)
    assert step_dirs(root) == ["step-000000000001", "step-000000000003"]
    assert verify_cli(root).returncode == 0


@pytest.mark.parametrize("mode", MODES)
def test_run_folder_deleted_mid_run_is_a_typed_error_every_time(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "run"
    state = sg.TrainState(model=torch.nn.Linear(4, 4))
    ck = sg.Checkpointer(root, save=sg.Every(steps=1), async_save=(mode == "async"))
    try:
        ck.save(state, 1)
        shutil.rmtree(root)
        for s in (2, 3):
            with pytest.raises(sg.StorageError) as info:
                ck.step(state, s)
                ck.wait()
            assert info.value.step == s
            assert str(root) in str(info.value)
    finally:
        try:
            ck.close()
        except sg.CheckpointError:
            pass
    assert not root.exists() or step_dirs(root) == []


class ExplodingState:
    """A Stateful object whose state_dict() raises when told to."""

    def __init__(self) -> None:
        self.fail = False

    def state_dict(self) -> dict[str, Any]:
        if self.fail:
            raise ValueError("user state_dict exploded")
        return {"x": torch.ones(2)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.loaded = d


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", ["save", "save_async", "step"])
def test_user_state_dict_raises_on_callers_thread_nothing_written(
    tmp_path: Path, mode: str, call: str
) -> None:
    root = tmp_path / "run"
    obj = ExplodingState()
    state = sg.TrainState(model=torch.nn.Linear(2, 2), thing=obj)
    with sg.Checkpointer(root, save=sg.Every(steps=1), async_save=(mode == "async")) as ck:
        ck.save(state, 1)
        obj.fail = True
        with pytest.raises(Exception) as info:
            getattr(ck, call)(state, 2)
            ck.wait()
        exc = info.value
        chain = [exc, exc.__cause__, exc.__context__]
        assert any(isinstance(e, ValueError) and "exploded" in str(e) for e in chain), repr(exc)
        assert step_dirs(root) == ["step-000000000001"] and temp_dirs(root) == []
        obj.fail = False
        ck.step(state, 2)  # not raised a second time; the step saves now
        ck.wait()
        ck.save(state, 3)
    assert step_dirs(root) == ["step-000000000001", "step-000000000002", "step-000000000003"]
    assert verify_cli(root).returncode == 0


NT = collections.namedtuple("NT", "a b")


@dataclasses.dataclass
class DC:
    a: int = 1


class Color(enum.IntEnum):
    RED = 1


class PlainObject:
    pass


UNENCODABLE = {
    "lambda": lambda: 1,
    "namedtuple": NT(1, 2),
    "dataclass": DC(),
    "intenum": Color.RED,
    "object": PlainObject(),
    "bytearray": bytearray(b"x"),
    "defaultdict": collections.defaultdict(int),
    "np_str": np.str_("x"),
    "lone_surrogate": "\udc80",
    "stateful_inside_extras": ExplodingState(),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(UNENCODABLE))
def test_unencodable_extras_refused_naming_the_key(tmp_path: Path, mode: str, kind: str) -> None:
    root = tmp_path / "run"
    extras: dict[str, Any] = {"ok": 1, "deep": {"list": [0, {"bad": UNENCODABLE[kind]}]}}
    state = sg.TrainState(model=torch.nn.Linear(2, 2), extras=extras)
    with sg.Checkpointer(root, async_save=(mode == "async")) as ck:
        with pytest.raises(sg.EncodeError) as info:
            if mode == "sync":
                ck.save(state, 1)
            else:
                ck.save_async(state, 1)
        assert info.value.key == "extras/deep/list/1/bad", info.value.key
        assert "extras/deep/list/1/bad" in str(info.value)
        assert step_dirs(root) == [] and temp_dirs(root) == []
        extras["deep"]["list"][1]["bad"] = 3
        ck.save(state, 1)
    assert verify_cli(root).returncode == 0


def _meta() -> torch.Tensor:
    return torch.empty(3, device="meta")


def _nested() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])


def _coo() -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([[0, 1], [2, 0]]), torch.tensor([3.0, 4.0]), (2, 3))


def _quiet(make: Any) -> Any:
    def build() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's beta/deprecation warnings for these layouts
            return make()

    return build


UNSUPPORTED_TENSORS = [
    pytest.param(
        _quiet(_coo),
        id="sparse_coo",
    ),
    pytest.param(
        _quiet(lambda: _coo().to_sparse_csr()),
        id="sparse_csr",
    ),
    pytest.param(
        _meta,
        id="meta",
    ),
    pytest.param(
        _quiet(_nested),
        id="nested",
    ),
    pytest.param(
        _quiet(lambda: torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)), id="qint8"
    ),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", UNSUPPORTED_TENSORS)
def test_unsupported_tensor_refused_typed_naming_the_key(
    tmp_path: Path, mode: str, make: Any
) -> None:
    root = tmp_path / "run"
    extras: dict[str, Any] = {"weird": make()}
    state = sg.TrainState(extras=extras)
    with sg.Checkpointer(root, async_save=(mode == "async")) as ck:
        try:
            with pytest.raises(sg.CheckpointError) as info:
                if mode == "sync":
                    ck.save(state, 1)
                else:
                    ck.save_async(state, 1)
                    ck.wait()
        finally:
            extras["weird"] = torch.zeros(1)
        assert info.value.key == "extras/weird" or "extras/weird" in str(info.value), repr(
            info.value
        )
        assert step_dirs(root) == [] and temp_dirs(root) == []
        ck.save(state, 1)


# ---- 2. async saves: failures, handles, the process's end ------------------------------------------
def test_background_failure_raised_once_at_next_step_with_step_and_cause(tmp_path: Path) -> None:
    inner = LocalStore(tmp_path / "run")
    store = FaultyStore(inner, {"stage.write": 2})  # the second save's file: a full disk
    model = torch.nn.Linear(4, 4)
    state = sg.TrainState(model=model)
    with sg.Checkpointer(store, save=sg.Every(steps=1), async_save=True) as ck:
        assert ck.step(state, 1)
        ck.wait()
        assert ck.step(state, 2)  # staged; fails in the background
        time.sleep(0.3)
        with pytest.raises(sg.StorageError) as info:
            ck.step(state, 3)  # the next step raises it (waiting for the save if need be)
        raised = [info.value]
        err = raised[0]
        assert err.__cause__ is not None and "space" in str(err).lower()
        # once: the next calls work normally
        assert ck.step(state, 4)
        ck.wait()
        ck.save(state, 10)
    root = tmp_path / "run"
    assert "step-000000000002" not in step_dirs(root) and temp_dirs(root) == []
    assert "step-000000000003" not in step_dirs(root)
    assert {"step-000000000001", "step-000000000004", "step-000000000010"} <= set(step_dirs(root))
    assert verify_cli(root).returncode == 0


def test_background_failure_raised_by_close_after_releasing_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "run"
    store = FaultyStore(LocalStore(root), {"commit.seal": 2})
    state = sg.TrainState(model=torch.nn.Linear(4, 4))
    ck = sg.Checkpointer(store, async_save=True)
    ck.save(state, 1)
    h = ck.save_async(state, 2)
    assert h is not None
    with pytest.raises(sg.StorageError) as info:
        ck.close()
    assert info.value.step == 2
    # the lock is released: a new writer opens the run and resumes from step 1
    with sg.Checkpointer(root) as ck2:
        assert ck2.restore(sg.TrainState(model=torch.nn.Linear(4, 4))) == 1
    assert step_dirs(root) == ["step-000000000001"] and temp_dirs(root) == []


def test_failure_taken_from_result_is_not_raised_again(tmp_path: Path) -> None:
    root = tmp_path / "run"
    store = FaultyStore(LocalStore(root), {"commit.publish": 1})
    state = sg.TrainState(model=torch.nn.Linear(4, 4))
    with sg.Checkpointer(store, save=sg.Every(steps=1), async_save=True) as ck:
        h = ck.save_async(state, 1)
        assert h is not None
        with pytest.raises(sg.CheckpointError):
            h.result(timeout=30)
        assert ck.step(state, 2)  # not raised again
        ck.wait()
    assert step_dirs(root) == ["step-000000000002"] and temp_dirs(root) == []


def test_save_handle_methods_and_close_while_in_flight(tmp_path: Path) -> None:
    root = tmp_path / "run"
    store = SlowCommitStore(root)
    SlowCommitStore.delay = 1.0
    model = torch.nn.Linear(4, 4)
    state = sg.TrainState(model=model)
    ck = sg.Checkpointer(store, async_save=True)
    try:
        h = ck.save_async(state, 1)
        assert h is not None and not h.done()
        with pytest.raises(TimeoutError):
            h.result(timeout=0.05)
        assert h.cancel() is False  # already running: cannot be cancelled
        path = h.result(timeout=30)
        assert h.done() and Path(path).name == "step-000000000001"
        h2 = ck.save_async(state, 2)
        assert h2 is not None and not h2.done()
    finally:
        t0 = time.monotonic()
        ck.close()  # waits for the save in flight
    assert h2.done() and time.monotonic() - t0 > 0.2
    assert step_dirs(root) == ["step-000000000001", "step-000000000002"] and temp_dirs(root) == []
    assert verify_cli(root).returncode == 0


@pytest.mark.slow
def test_process_exits_without_close_leaves_nothing_visible(tmp_path: Path) -> None:
    root = tmp_path / "run"
    r = run_child([str(CHILDREN / "async_child.py"), str(root), "noclose"])
    assert r.returncode == 0, r.stderr[-3000:]
    # no half-written checkpoint is listed; what is listed verifies
    assert step_dirs(root)[0] == "step-000000000001"
    assert verify_cli(root).returncode == 0
    from async_child import build

    model, opt = build()
    state = sg.TrainState(model=model, optimizer=opt, extras={})
    with sg.Checkpointer(root) as ck:
        step = ck.restore(state)
        assert temp_dirs(root) == []  # leftovers removed by the next writer
    assert step in (1, 2)
    if step == 2:
        from async_child import digest

        snap2 = [ln.split()[2] for ln in r.stdout.splitlines() if ln.startswith("SNAP 2 ")][0]
        assert digest(model, opt) == snap2


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["sigterm", "sigint"])
def test_signal_while_async_save_in_flight_saves_and_exits_75(tmp_path: Path, sig: str) -> None:
    root = tmp_path / "run"
    r = run_child([str(CHILDREN / "async_child.py"), str(root), sig])
    assert r.returncode == sg.EXIT_PREEMPTED, (r.returncode, r.stdout, r.stderr[-3000:])
    assert "NOT EXITED" not in r.stdout
    assert step_dirs(root) == ["step-000000000001", "step-000000000002", "step-000000000003"]
    assert temp_dirs(root) == []
    assert verify_cli(root).returncode == 0
    from async_child import build, digest

    snaps = dict(ln.split()[1:3] for ln in r.stdout.splitlines() if ln.startswith("SNAP "))
    model, opt = build()
    with sg.Checkpointer(root) as ck:
        assert ck.restore(sg.TrainState(model=model, optimizer=opt, extras={})) == 3
    assert digest(model, opt) == snaps["3"]
    model, opt = build()
    with sg.Checkpointer(root) as ck:
        assert ck.restore(sg.TrainState(model=model, optimizer=opt, extras={}), step=2) == 2
    assert digest(model, opt) == snaps["2"]


@pytest.mark.slow
def test_kill9_during_background_write_resumes_newest_complete_bitwise(tmp_path: Path) -> None:
    root = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(CHILDREN / "async_child.py"), str(root), "train"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith("SNAP 7 "):
                time.sleep(0.07)  # inside the next save's slow commit
                break
    finally:
        proc.kill()  # SIGKILL
        proc.wait(30)
        assert proc.stdout is not None and proc.stderr is not None
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    snaps = dict(ln.split()[1:3] for ln in lines if ln.startswith("SNAP "))
    committed = [int(ln.split()[1]) for ln in lines if ln.startswith("COMMITTED ")]
    assert "7" in snaps, (lines, stderr[-3000:])
    from async_child import build, digest

    model, opt = build()
    with sg.Checkpointer(root) as ck:
        step = ck.restore(sg.TrainState(model=model, optimizer=opt, extras={}))
    assert step >= max(committed)
    assert digest(model, opt) == snaps[str(step)]
    assert temp_dirs(root) == []
    assert verify_cli(root).returncode == 0


# ---- 2b. async saves are never torn ---------------------------------------------------------------
def _mutate(
    kind: str, model: torch.nn.Module, opt: torch.optim.Optimizer, extras: dict[str, Any]
) -> None:
    with torch.no_grad():
        if kind == "param_inplace":
            for p in model.parameters():
                p.add_(1.0)
        elif kind == "param_data_inplace":
            for p in model.parameters():
                p.data.mul_(-3.0)
        elif kind == "param_data_assign":
            for p in model.parameters():
                p.data = torch.full_like(p, 7.0)
        elif kind == "no_grad_copy":
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        elif kind == "bn_forward":
            model.train()
            model(torch.randn(8, 6) * 5 + 3)
        elif kind == "extras_tensor_inplace":
            extras["t"].add_(100)
            extras["arr"] += 5
            extras["lst"].append(99)
            extras["nested"]["k"] = "changed"
            extras["int"] = 123
        elif kind == "state_dict_values_zeroed":
            for v in model.state_dict().values():
                v.zero_()
            for s in opt.state.values():
                for v in s.values():
                    if isinstance(v, torch.Tensor):
                        v.zero_()
    if kind.startswith("opt_"):
        model.train()
        loss = model(torch.randn(8, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _build_for_torn(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2)
    )
    opt_kwargs: dict[str, Any] = {}
    if kind == "opt_foreach":
        opt_kwargs = {"foreach": True}
    elif kind == "opt_fused":
        opt_kwargs = {"fused": True}
    elif kind == "opt_forloop":
        opt_kwargs = {"foreach": False}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, **opt_kwargs)
    extras: dict[str, Any] = {
        "t": torch.arange(5.0),
        "arr": np.arange(4, dtype=np.int32),
        "lst": [1, 2],
        "nested": {"k": "v"},
        "int": 1,
    }
    return model, opt, extras


def _one_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model.train()
    loss = model(torch.randn(8, 6)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


TORN_KINDS = [
    "param_inplace",
    "param_data_inplace",
    "param_data_assign",
    "no_grad_copy",
    "bn_forward",
    "extras_tensor_inplace",
    "state_dict_values_zeroed",
    "opt_foreach",
    "opt_fused",
    "opt_forloop",
]


@pytest.mark.parametrize("how", ["save_async", "step"])
@pytest.mark.parametrize("kind", TORN_KINDS)
def test_async_snapshot_holds_values_at_save_time(tmp_path: Path, kind: str, how: str) -> None:
    root = tmp_path / "run"
    model, opt, extras = _build_for_torn(kind)
    if kind == "opt_fused":
        try:
            _one_step(model, opt)
        except RuntimeError as exc:
            pytest.skip(f"fused AdamW on CPU not available: {exc}")
    else:
        _one_step(model, opt)  # optimizer moments exist
    store = GatedStore(root)
    state = sg.TrainState(model=model, optimizer=opt, extras=extras)
    with sg.Checkpointer(store, save=sg.Every(steps=5), async_save=True) as ck:
        store.gate.clear()
        want_model = model_state(model)
        want_opt = [
            {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
            for s in opt.state_dict()["state"].values()
        ]
        want_extras = {
            "t": extras["t"].clone(),
            "arr": extras["arr"].copy(),
            "lst": list(extras["lst"]),
            "nested": dict(extras["nested"]),
            "int": extras["int"],
        }
        if how == "save_async":
            h = ck.save_async(state, 5)
            assert h is not None and not h.done()
        else:
            assert ck.step(state, 5) is True
        _mutate(kind, model, opt, extras)
        store.gate.set()
        ck.wait()
    assert store.begin_threads and all(n != "MainThread" for n in store.begin_threads)

    model2, opt2, _ = _build_for_torn(kind)
    extras2: dict[str, Any] = {}
    with sg.Checkpointer(root) as ck:
        assert ck.restore(sg.TrainState(model=model2, optimizer=opt2, extras=extras2)) == 5
    for k, v in want_model.items():
        assert_same_tensor(v, model2.state_dict()[k], k)
    got_opt = list(opt2.state_dict()["state"].values())
    assert len(got_opt) == len(want_opt)
    for w, g in zip(want_opt, got_opt, strict=True):
        for k, v in w.items():
            if isinstance(v, torch.Tensor):
                assert_same_tensor(v, g[k], k)
            else:
                assert g[k] == v
    assert_same_tensor(want_extras["t"], extras2["t"])
    assert extras2["arr"].dtype == np.int32 and (extras2["arr"] == want_extras["arr"]).all()
    assert extras2["lst"] == want_extras["lst"]
    assert extras2["nested"] == want_extras["nested"] and extras2["int"] == want_extras["int"]


# ---- 3. unusual tensors and state -----------------------------------------------------------------
def _nan_payloads() -> torch.Tensor:
    words = [
        0x7FC00001,
        0xFFC00000,
        0x7F800001,
        0xFFBFFFFF,
        0x7F800000,
        0xFF800000,
        0x80000000,
        0x00000001,
    ]
    return torch.from_numpy(np.frombuffer(struct.pack("<8I", *words), dtype=np.float32).copy())


def unusual_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 8, generator=g)
    half_bits = torch.from_numpy(
        np.array([0x7E01, 0xFE00, 0x7C00, 0x8000, 0x0001], dtype=np.uint16).view(np.int16)
    )
    return {
        "transposed": base.t(),
        "strided_slice": base[::2, 1::3],
        "narrow_offset": base[3:, 2:5],
        "expanded": torch.randn(3, 1, generator=g).expand(3, 5),
        "permuted": torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
        "zero_size": torch.empty(0, 4),
        "zero_size_int": torch.empty(3, 0, dtype=torch.int64),
        "zero_dim": torch.tensor(3.25),
        "zero_dim_int": torch.tensor(-7, dtype=torch.int64),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "fp16": torch.randn(7, generator=g).half(),
        "fp16_nan_payload": half_bits.view(torch.float16),
        "bf16_nan_payload": half_bits.view(torch.bfloat16),
        "fp8_e4m3fn": torch.tensor([0, 1, 0x7F, 0xFF, 0x80, 0x01], dtype=torch.uint8).view(
            torch.float8_e4m3fn
        ),
        "fp8_e5m2": torch.randn(5, generator=g).to(torch.float8_e5m2),
        "complex64": torch.randn(4, dtype=torch.complex64, generator=g),
        "complex128": torch.randn(4, dtype=torch.complex128, generator=g),
        "complex64_conj_view": torch.randn(4, dtype=torch.complex64, generator=g).conj(),
        "bool": torch.tensor([True, False, True]),
        "int8_extremes": torch.tensor([-128, 127, 0, -1], dtype=torch.int8),
        "uint8_extremes": torch.tensor([0, 255, 128], dtype=torch.uint8),
        "int16_extremes": torch.tensor([-(2**15), 2**15 - 1], dtype=torch.int16),
        "int32_extremes": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        "int64_extremes": torch.tensor([-(2**63), 2**63 - 1, 0], dtype=torch.int64),
        "uint16": torch.tensor([0, 65535], dtype=torch.uint16),
        "float64_nan_payload": torch.from_numpy(
            np.frombuffer(
                struct.pack("<3Q", 0x7FF8000000000001, 0xFFF0000000000001, 0x8000000000000000),
                dtype=np.float64,
            ).copy()
        ),
        "float32_nan_payload": _nan_payloads(),
        "float32_inf": torch.tensor([float("inf"), float("-inf"), -0.0]),
    }


@pytest.mark.parametrize("mode", MODES)
def test_unusual_tensors_round_trip_bitwise_into_a_fresh_dict(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "run"
    want = unusual_tensors()
    extras: dict[str, Any] = dict(want)
    with sg.Checkpointer(root, async_save=(mode == "async")) as ck:
        if mode == "sync":
            ck.save(sg.TrainState(extras=extras), 1)
        else:
            h = ck.save_async(sg.TrainState(extras=extras), 1)
            assert h is not None
            h.result(timeout=60)
    assert verify_cli(root).returncode == 0
    got: dict[str, Any] = {}
    with sg.Checkpointer(root) as ck:
        assert ck.restore(sg.TrainState(extras=got)) == 1
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert_same_tensor(v, got[k], k)
    # sg.open reads the same bytes
    with sg.open(root / "step-000000000001") as r:
        for k in ("transposed", "fp8_e4m3fn", "float32_nan_payload", "int64_extremes"):
            assert_same_tensor(want[k], r.read(f"extras/{k}"), k)


def test_unusual_tensors_restore_into_live_non_contiguous_targets(tmp_path: Path) -> None:
    root = tmp_path / "run"
    want = unusual_tensors()
    with sg.Checkpointer(root) as ck:
        ck.save(sg.TrainState(extras=dict(want)), 1)
    live = {
        k: torch.zeros_like(v) if v.dtype != torch.bool else torch.zeros_like(v)
        for k, v in want.items()
    }
    live["transposed"] = torch.zeros(8, 6).t().t().t()  # a non-contiguous live target
    live["strided_slice"] = torch.zeros(6, 8)[::2, 1::3]
    with sg.Checkpointer(root) as ck:
        ck.restore(sg.TrainState(extras=live))
    for k, v in want.items():
        assert_same_tensor(v, live[k], k)


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied weights
        self.frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("persistent_buf", torch.arange(3.0))
        self.register_buffer("scratch", torch.full((2,), 5.0), persistent=False)


@pytest.mark.parametrize("mode", MODES)
def test_tied_weights_frozen_params_and_non_persistent_buffers(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "run"
    torch.manual_seed(0)
    m = Tied()
    with torch.no_grad():
        m.scratch.fill_(9.0)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    loss = m.head(m.emb(torch.tensor([1, 2]))).sum()
    loss.backward()
    opt.step()
    want = model_state(m)
    with sg.Checkpointer(root, async_save=(mode == "async")) as ck:
        ck.save(sg.TrainState(model=m, optimizer=opt), 1)
    with sg.open(root / "step-000000000001") as r:
        keys = set(r.keys())
    assert not any("scratch" in k for k in keys), keys  # persistent=False: not saved
    assert "model/frozen" in keys and "model/persistent_buf" in keys
    torch.manual_seed(1)
    m2 = Tied()
    opt2 = torch.optim.SGD([p for p in m2.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    with sg.Checkpointer(root) as ck:
        assert ck.restore(sg.TrainState(model=m2, optimizer=opt2)) == 1
    for k, v in want.items():
        assert_same_tensor(v, m2.state_dict()[k], k)
    assert m2.head.weight is m2.emb.weight  # still tied
    assert m2.frozen.requires_grad is False and m2.emb.weight.requires_grad is True
    assert torch.equal(m2.scratch, torch.full((2,), 5.0))  # left as constructed
    with torch.no_grad():
        m2.emb.weight.add_(1)
    assert torch.equal(m2.head.weight, m2.emb.weight)
    # optimizer momentum came back for the (shared) parameter
    assert_same_tensor(
        opt.state_dict()["state"][0]["momentum_buffer"],
        opt2.state_dict()["state"][0]["momentum_buffer"],
    )


def test_view_of_a_parameter_in_extras_round_trips(tmp_path: Path) -> None:
    root = tmp_path / "run"
    m = torch.nn.Linear(3, 3)
    extras: dict[str, Any] = {"row": m.weight[1], "col": m.weight[:, 2]}
    want_row, want_col = extras["row"].detach().clone(), extras["col"].detach().clone()
    with sg.Checkpointer(root) as ck:
        ck.save(sg.TrainState(model=m, extras=extras), 1)
    m2 = torch.nn.Linear(3, 3)
    ex2: dict[str, Any] = {}
    with sg.Checkpointer(root) as ck:
        ck.restore(sg.TrainState(model=m2, extras=ex2))
    assert_same_tensor(want_row, ex2["row"])
    assert_same_tensor(want_col, ex2["col"])
    assert torch.equal(ex2["row"], m2.weight[1]) and torch.equal(ex2["col"], m2.weight[:, 2])


def _seq() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))


def test_torch_compile_round_trip_and_cross_restore_never_silent(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = _seq()
    with torch.no_grad():
        plain[1].running_mean.add_(2)
    compiled = torch.compile(plain)
    want = model_state(plain)
    with sg.Checkpointer(tmp_path / "c") as ck:
        ck.save(sg.TrainState(model=compiled), 1)
    with sg.Checkpointer(tmp_path / "p") as ck:
        ck.save(sg.TrainState(model=plain), 1)
    # compiled -> compiled: exact
    torch.manual_seed(1)
    m = _seq()
    with sg.Checkpointer(tmp_path / "c") as ck:
        assert ck.restore(sg.TrainState(model=torch.compile(m))) == 1
    for k, v in want.items():
        assert_same_tensor(v, m.state_dict()[k], k)
    # across: exact, or refused typed naming the model and nothing changed (never half-loaded)
    for run, target_compiled in (("c", False), ("p", True)):
        torch.manual_seed(1)
        m = _seq()
        before = model_state(m)
        target = torch.compile(m) if target_compiled else m
        try:
            with sg.Checkpointer(tmp_path / run) as ck:
                ck.restore(sg.TrainState(model=target))
        except sg.RestoreError as exc:
            assert exc.key == "model"
            assert "_orig_mod." in str(exc)
            for k, v in before.items():
                assert_same_tensor(v, m.state_dict()[k], k)
        else:
            for k, v in want.items():
                assert_same_tensor(v, m.state_dict()[k], k)


@pytest.mark.parametrize("mode", MODES)
def test_ten_thousand_tiny_tensors(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "run"
    extras = {f"t{i:05d}": torch.tensor([float(i), -float(i)]) for i in range(10_000)}
    t0 = time.monotonic()
    with sg.Checkpointer(root, async_save=(mode == "async")) as ck:
        if mode == "sync":
            ck.save(sg.TrainState(extras=extras, rng=False), 1)
        else:
            h = ck.save_async(sg.TrainState(extras=extras, rng=False), 1)
            assert h is not None
            # snapshot taken: changing every tensor does not reach the checkpoint
            for t in extras.values():
                t.zero_()
            h.result(timeout=120)
    saved_in = time.monotonic() - t0
    got: dict[str, Any] = {}
    with sg.Checkpointer(root) as ck:
        ck.restore(sg.TrainState(extras=got, rng=False))
    assert len(got) == 10_000
    for i in (0, 1, 4999, 9999):
        assert got[f"t{i:05d}"].tolist() == [float(i), -float(i)]
    assert saved_in < 60


@dataclasses.dataclass
class Config:
    lr: float = 0.1


def test_deep_nested_extras_round_trip_exact_types(tmp_path: Path) -> None:
    root = tmp_path / "run"
    deep: Any = "bottom"
    for i in range(150):
        deep = [deep] if i % 3 == 0 else ({"k": deep} if i % 3 == 1 else (deep,))
    extras: dict[str, Any] = {
        "none": None,
        "s": "ü ∑ \u202e",
        "b": b"\x00\xff",
        "i": -(2**70),
        "f": 0.1,
        "nan": float("nan"),
        "ninf": float("-inf"),
        "negzero": -0.0,
        "tuple": (1, (2, [3, (None,)])),
        "set": {1, 2},
        "fset": frozenset({"a"}),
        "intkeys": {1: "a", (2, 3): "b", None: 0, "$x": 1},
        "od": collections.OrderedDict([(2, "x"), (1, "y")]),
        "np_arr": np.arange(6, dtype=np.float16).reshape(2, 3)[:, ::2],
        "np_f32": np.float32(1.5),
        "np_i64": np.int64(-(2**62)),
        "np_bool": np.bool_(True),
        "np_u8": np.uint8(255),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "deep": deep,
        "config_asdict": dataclasses.asdict(Config()),
    }
    with sg.Checkpointer(root) as ck:
        ck.save(sg.TrainState(extras=extras, rng=False), 1)
    got: dict[str, Any] = {}
    with sg.Checkpointer(root) as ck:
        ck.restore(sg.TrainState(extras=got, rng=False))
    for k, v in extras.items():
        g = got[k]
        if isinstance(v, np.ndarray):
            assert isinstance(g, np.ndarray) and g.dtype == v.dtype and g.shape == v.shape
            assert g.tobytes() == v.tobytes()
        elif isinstance(v, float) and v != v:
            assert isinstance(g, float) and g != g
        elif k == "negzero":
            assert struct.pack("<d", g) == struct.pack("<d", v)
        else:
            assert type(g) is type(v), (k, type(g), type(v))
            assert g == v, k
    assert type(got["intkeys"]) is dict and list(got["intkeys"]) == list(extras["intkeys"])
    assert list(got["od"]) == [2, 1]


def test_extras_with_dataclass_or_namedtuple_refused_with_a_hint(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with sg.Checkpointer(root) as ck:
        for bad, hint in ((Config(), "state_dict"), (NT(1, 2), "_asdict")):
            with pytest.raises(sg.EncodeError) as info:
                ck.save(sg.TrainState(extras={"cfg": bad}, rng=False), 1)
            assert info.value.key == "extras/cfg" and hint in str(info.value)
    assert step_dirs(root) == [] and temp_dirs(root) == []


@pytest.mark.parametrize("mode", MODES)
def test_disk_full_error_names_the_failed_step(tmp_path: Path, mode: str) -> None:
    """README: every error carries .step; docs/async.md: a background failure's .step names the
    failed save."""
    root = tmp_path / "run"
    store = FaultyStore(LocalStore(root), {"stage.write": 2})  # the second save: a full disk
    state = sg.TrainState(model=torch.nn.Linear(4, 4))
    with sg.Checkpointer(store, async_save=(mode == "async")) as ck:
        ck.save(state, 1)
        with pytest.raises(sg.StorageError) as info:
            if mode == "sync":
                ck.save(state, 2)
            else:
                h = ck.save_async(state, 2)
                assert h is not None
                h.result(timeout=30)
        assert "space" in str(info.value).lower()
        assert info.value.step == 2


def test_stateful_object_inside_extras_refusal_names_the_fix(tmp_path: Path) -> None:
    """README rule 4: extras go in a dict, or in an object with state_dict()/load_state_dict().
    An object that has both but sits inside the dict is refused (tested above); the message must
    say what to do: pass it to TrainState under its own name."""
    with sg.Checkpointer(tmp_path / "run") as ck:
        with pytest.raises(sg.EncodeError) as info:
            ck.save(sg.TrainState(extras={"ema": ExplodingState()}, rng=False), 1)
    assert info.value.key == "extras/ema"
    assert "TrainState" in str(info.value), str(info.value)


def test_a_run_folder_deleted_mid_run_is_named_as_gone(tmp_path: Path) -> None:
    """The next save after ``rm -rf RUN`` must not claim "earlier checkpoints are intact"."""
    import shutil

    root = tmp_path / "run"
    state = sg.TrainState(model=torch.nn.Linear(2, 2))
    with sg.Checkpointer(root, async_save=False) as ck:
        ck.save(state, 1)
        shutil.rmtree(root)
        with pytest.raises(sg.StorageError) as info:
            ck.save(state, 2)
        assert "run folder itself is gone" in str(info.value), str(info.value)
        assert "intact" not in str(info.value)
        assert info.value.step == 2
