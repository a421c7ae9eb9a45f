"""The incremental-save scrub seen from the outside (commit 3d110c0, docs/incremental.md "Bit
rot"): bit rot in a shared file is found within the stated number of saves, healed by writing
the piece in full, and never makes a save fail or lose an earlier checkpoint. Every call order a
user may take (save, save_async, step() with Every, restore then save, a new Checkpointer, the
two-tier cache), every way a shared file can go bad (flipped byte in the previous step's file,
in a retired file, two steps back, in the header; deleted, a directory, a symlink, unreadable),
retention after damage, and the cost claim. A test marked xfail(strict=True) pins a bug."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame.engine import reader, writer
from savegame.format import layout, manifest
from savegame.storage import local as local_store


class Box:
    def __init__(self) -> None:
        self.d: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.d)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.d = dict(sd)


def _ckpt(root: Any, **kw: Any) -> sg.Checkpointer:
    kw.setdefault("keep", sg.Keep(last=10))
    kw.setdefault("save", sg.Every(steps=1))
    return sg.Checkpointer(root, handle_signals=False, **kw)


def _frozen(keys: list[str], numel: int = 1024) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(numel, generator=g) for k in keys}


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def _chunk(root: Path, step: int, key: str) -> manifest.Chunk:
    return reader.read_manifest(root / layout.step_dir(step)).tensors[f"box/{key}"].chunks[0]


def _own(root: Path, step: int, key: str) -> bool:
    return not manifest.is_ref(_chunk(root, step, key).file)


def _file(root: Path, step: int) -> Path:
    """Where step's rank-0 file is now: in its folder, else retired."""
    f = root / layout.step_dir(step) / layout.tensor_file(0)
    if f.exists():
        return f
    return root / layout.retired_file(f"{layout.step_dir(step)}/{layout.tensor_file(0)}")


def _clean(root: Path) -> dict[int, list[str]]:
    return {r.step: reader.verify(r.path) for r in reader.list_checkpoints(root)}


def _restore_equal(root: Path, want: dict[str, torch.Tensor], step: int | None = None) -> int:
    b = Box()
    with _ckpt(root) as ck:
        got = ck.restore(sg.TrainState(box=b, rng=False), step=step)
    assert got is not None
    assert b.d.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(b.d[k], v), k
    return got


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes of shared chunks the scrub re-reads (one entry per chunk read)."""
    got: list[int] = []
    real = writer._Scrub._intact

    def counting(
        self: Any, name: str, key: str, c: manifest.Chunk | None, size: int = -1
    ) -> bool:
        if c is not None:
            got.append(c.length)
        return real(self, name, key, c, size)

    monkeypatch.setattr(writer._Scrub, "_intact", counting)
    return got


@pytest.fixture(autouse=True)
def _fresh_scrub_state() -> Iterator[None]:
    writer.forget_recent()
    writer._scrub_damage.clear()
    yield
    writer.forget_recent()
    writer._scrub_damage.clear()


# ---- the damage found, healed, no save fails, in every call order ---------------------------------


def test_async_save_finds_damage_while_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0", "b1", "b2"])
    with _ckpt(root) as ck:
        box.d = {**base, "head": torch.zeros(8)}
        ck.save_async(st, 1).result()
        box.d = {**base, "head": torch.ones(8)}
        ck.save_async(st, 2).result()
        _flip(_file(root, 2), _chunk(root, 2, "head").offset + 1)  # the previous step's own file
        _flip(_file(root, 1), _chunk(root, 1, "b1").offset + 2)  # and two steps back
        box.d = {k: v.clone() for k, v in base.items()} | {"head": torch.ones(8)}
        with caplog.at_level(logging.WARNING, logger="savegame"):
            h = ck.save_async(st, 3)
            for t in box.d.values():  # training goes on, in place, while the save runs
                t.add_(1.0)
            h.result()
    assert _own(root, 3, "head") and _own(root, 3, "b1") and not _own(root, 3, "b0")
    assert _clean(root)[3] == []
    assert caplog.text.count("bit rot") >= 2
    _restore_equal(root, {**base, "head": torch.ones(8)})


def test_step_with_every_and_keep_last_1_heals_a_retired_file(tmp_path: Path) -> None:
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0", "b1"])
    with _ckpt(root, keep=sg.Keep(last=1), save=sg.Every(steps=2)) as ck:
        for step in range(1, 5):
            box.d = {**base, "head": torch.full((8,), float(step))}
            ck.step(st, step)
        retired = _file(root, 2)
        assert retired.name.startswith("retired-")  # step 2 is gone, step 4 uses its bytes
        _flip(retired, _chunk(root, 4, "b0").offset + 7)
        for step in range(5, 7):
            box.d = {**base, "head": torch.full((8,), float(step))}
            ck.step(st, step)
    assert _own(root, 6, "b0")
    assert _clean(root) == {6: []}
    _restore_equal(root, {**base, "head": torch.full((8,), 6.0)})


def test_restore_then_save_in_a_new_checkpointer_heals_damage_two_steps_back(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0", "b1"])
    with _ckpt(root) as ck:
        for step in (1, 2, 3):
            box.d = {**base, "head": torch.full((8,), float(step))}
            ck.save(st, step)
    b2 = Box()
    st2 = sg.TrainState(box=b2, rng=False)
    with _ckpt(root) as ck:
        assert ck.restore(st2) == 3
        # the bytes rot after the restore read them (steps 2 and 3 refer to step 1's file)
        _flip(_file(root, 1), _chunk(root, 1, "b1").offset + 11)
        b2.d = {**base, "head": torch.full((8,), 4.0)}
        ck.save(st2, 4)
    assert _own(root, 4, "b1") and not _own(root, 4, "b0")
    assert _clean(root)[4] == []
    _restore_equal(root, {**base, "head": torch.full((8,), 4.0)})


def test_close_and_reopen_keeps_healing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0", "b1"])
    for step in (1, 2):
        with _ckpt(root) as ck:
            box.d = {**base, "head": torch.full((8,), float(step))}
            ck.save(st, step)
    _flip(_file(root, 1), _chunk(root, 1, "b0").offset)
    for step in (3, 4):
        with _ckpt(root) as ck:
            box.d = {**base, "head": torch.full((8,), float(step))}
            ck.save(st, step)
    assert _own(root, 3, "b0") and not _own(root, 4, "b0")
    clean = _clean(root)
    assert clean[3] == [] and clean[4] == [] and clean[1] and clean[2]


def _two_saves_then(tmp_path: Path, spoil: Any) -> tuple[Path, dict[str, torch.Tensor]]:
    """Steps 1 and 2 (2 shares b0/b1 with 1), ``spoil(step-1 file)``, then steps 3 and 4."""
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0", "b1"])
    with _ckpt(root) as ck:
        for step in (1, 2):
            box.d = {**base, "head": torch.full((8,), float(step))}
            ck.save(st, step)
        spoil(_file(root, 1))
        for step in (3, 4):
            box.d = {**base, "head": torch.full((8,), float(step))}
            ck.save(st, step)
    return root, {**base, "head": torch.full((8,), 4.0)}


def _deleted(f: Path) -> None:
    f.unlink()


def _a_directory(f: Path) -> None:
    f.unlink()
    f.mkdir()


def _dangling_symlink(f: Path) -> None:
    f.unlink()
    f.symlink_to(f.parent / "nowhere")


def _symlink_to_other_bytes(f: Path) -> None:
    """A symlink to a file of the right size whose bytes differ (only the chunk check sees it)."""
    other = f.parent.parent / "other.bin"
    raw = bytearray(f.read_bytes())
    for i in range(len(raw) - 64, len(raw)):
        raw[i] ^= 0xFF
    other.write_bytes(bytes(raw))
    f.unlink()
    f.symlink_to(other)


def _grown(f: Path) -> None:
    with open(f, "ab") as out:
        out.write(b"\0" * 17)


@pytest.mark.parametrize(
    "spoil", [_deleted, _a_directory, _dangling_symlink, _symlink_to_other_bytes, _grown]
)
def test_a_shared_file_gone_or_replaced_is_written_again_not_a_failed_save(
    tmp_path: Path, spoil: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="savegame"):
        root, want = _two_saves_then(tmp_path, spoil)
    assert _own(root, 3, "b1")  # the last tensor of the file: damaged in every variant
    clean = _clean(root)
    assert clean[3] == [] and clean[4] == [], clean
    assert clean[2], "step 2 refers to the spoiled file: verify must say so"
    assert layout.step_dir(1) in caplog.text and "in full" in caplog.text
    _restore_equal(root, want)


def test_permission_denied_on_the_shared_file_is_a_full_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = local_store.LocalStore.open
    denied = f"{layout.step_dir(1)}/{layout.tensor_file(0)}"

    def open_(self: Any, key: str) -> Any:
        if key.endswith(denied):
            raise PermissionError(13, "Permission denied", key)
        return real(self, key)

    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0", "b1"])
    with _ckpt(root) as ck:
        for step in (1, 2):
            box.d = {**base, "head": torch.full((8,), float(step))}
            ck.save(st, step)
        monkeypatch.setattr(local_store.LocalStore, "open", open_)
        with caplog.at_level(logging.WARNING, logger="savegame"):
            box.d = {**base, "head": torch.full((8,), 3.0)}
            ck.save(st, 3)
        monkeypatch.setattr(local_store.LocalStore, "open", real)
    assert _own(root, 3, "b0") and _own(root, 3, "b1")
    assert "Permission denied" in caplog.text and "cannot be read" in caplog.text
    assert _clean(root)[3] == []


def test_damage_in_the_header_region_breaks_only_its_own_checkpoint(tmp_path: Path) -> None:
    """Offsets of a shared file come from the manifest (its header is never used through a
    reference): a flipped header byte damages the checkpoint that owns the file, not those that
    share its tensors, and no save fails."""

    def header(f: Path) -> None:
        _flip(f, 8 + 2)  # inside the JSON header, after the 8-byte length

    root, want = _two_saves_then(tmp_path, header)
    clean = _clean(root)
    assert clean[1], "the owner's header is damaged: verify must say so"
    assert clean[2] == [] and clean[3] == [] and clean[4] == []
    _restore_equal(root, want)


def test_log_message_names_file_offset_and_what_happens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0"])
    with _ckpt(root) as ck:
        box.d = {**base, "head": torch.zeros(8)}
        ck.save(st, 1)
        c = _chunk(root, 1, "b0")
        _flip(_file(root, 1), c.offset + 3)
        box.d = {**base, "head": torch.ones(8)}
        with caplog.at_level(logging.WARNING, logger="savegame"):
            ck.save(st, 2)
    warn = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warn) == 1, warn
    msg = warn[0]
    assert str(_file(root, 1)) in msg or f"{layout.step_dir(1)}/{layout.tensor_file(0)}" in msg
    assert f"offset {c.offset}" in msg and "in full" in msg and "savegame verify" in msg


# ---- retention after damage ---------------------------------------------------------------------


def test_keep_last_2_sets_aside_a_damaged_checkpoint_whose_own_file_is_still_used(
    tmp_path: Path,
) -> None:
    """Step 2 refers to the rotten bytes (damaged) but owns the only copy of ``mid``, which the
    healed step 3 refers to: setting step 2 aside must keep ``mid`` reachable."""
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0", "b1"])
    mid = torch.arange(64, dtype=torch.float32)
    with _ckpt(root, keep=sg.Keep(last=2)) as ck:
        box.d = {**base, "mid": torch.zeros(64), "head": torch.zeros(8)}
        ck.save(st, 1)
        box.d = {**base, "mid": mid, "head": torch.ones(8)}
        ck.save(st, 2)
        _flip(_file(root, 1), _chunk(root, 1, "b0").offset + 5)
        box.d = {**base, "mid": mid, "head": torch.full((8,), 3.0)}
        ck.save(st, 3)
        assert not _own(root, 3, "mid") and _own(root, 3, "b0")
        box.d = {**base, "mid": mid, "head": torch.full((8,), 4.0)}
        ck.save(st, 4)
    clean = _clean(root)
    assert clean and all(p == [] for p in clean.values()), clean
    assert 4 in clean
    assert any(p.name.startswith("damaged-step-") for p in root.iterdir())
    _restore_equal(root, {**base, "mid": mid, "head": torch.full((8,), 4.0)})


def test_keep_last_2_damage_in_the_previous_steps_own_file_keeps_the_intact_older_one(
    tmp_path: Path,
) -> None:
    """Rot in step 2's own file damages step 2 only: the intact step 1 must not be lost."""
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0"])
    with _ckpt(root, keep=sg.Keep(last=3)) as ck:
        box.d = {**base, "mid": torch.zeros(64), "head": torch.zeros(8)}
        ck.save(st, 1)
        box.d = {**base, "mid": torch.ones(64), "head": torch.ones(8)}
        ck.save(st, 2)
        _flip(_file(root, 2), _chunk(root, 2, "mid").offset + 1)
        for step in (3, 4):
            box.d = {**base, "mid": torch.ones(64), "head": torch.full((8,), float(step))}
            ck.save(st, step)
    clean = _clean(root)
    assert clean.get(1) == [] and clean.get(4) == [] and clean.get(3) == [], clean
    _restore_equal(root, {**base, "mid": torch.zeros(64), "head": torch.zeros(8)}, step=1)


def test_async_keep_last_2_damage_in_a_retired_file_leaves_only_intact_checkpoints(
    tmp_path: Path,
) -> None:
    """Retention after an async save runs on the persist worker: the scrub's finding must reach
    it there too, so the kept checkpoints that refer to the rotten bytes are set aside."""
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0", "b1"])
    with _ckpt(root, keep=sg.Keep(last=2)) as ck:
        for step in (1, 2, 3):
            box.d = {**base, "head": torch.full((8,), float(step))}
            ck.save_async(st, step)
        ck.wait()
        retired = _file(root, 1)
        assert retired.name.startswith("retired-")
        _flip(retired, _chunk(root, 3, "b0").offset + 3)  # steps 2 and 3 refer to it
        for step in (4, 5):
            box.d = {**base, "head": torch.full((8,), float(step))}
            ck.save_async(st, step)
            box.d = {}  # the loop goes on with other objects
    clean = _clean(root)
    assert 5 in clean and all(p == [] for p in clean.values()), clean
    _restore_equal(root, {**base, "head": torch.full((8,), 5.0)})


# ---- the stated number of saves ------------------------------------------------------------------


def test_a_new_checkpointer_every_few_saves_never_reaches_the_end_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preemptible job opens a new Checkpointer (a new process) every few saves. The round's
    progress lives only in memory (writer._scrubbed, cleared by every new Checkpointer), and
    each round starts again at the beginning of the file: the tail of a large state is never
    re-read, against "every shared byte is checked again at least once every 1/SHARE saves"."""
    monkeypatch.setattr(writer, "SCRUB_MIN_BYTES", 0)
    monkeypatch.setattr(writer, "SCRUB_SHARE", 1 / 4)
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen([f"base{i}" for i in range(8)], numel=4096)
    with _ckpt(root) as ck:
        box.d = {**base, "head": torch.zeros(4)}
        ck.save(st, 1)
    _flip(_file(root, 1), _chunk(root, 1, "base7").offset + 9)
    step = 1
    for _session in range(4):  # 8 saves in all: twice the stated 4
        with _ckpt(root) as ck:
            for _ in range(2):
                step += 1
                box.d = {**base, "head": torch.full((4,), float(step))}
                ck.save(st, step)
    healed = [s for s in range(2, step + 1) if _own(root, s, "base7")]
    assert healed and healed[0] <= 1 + 4, f"base7 never re-read in {step - 1} saves"


def test_pieces_that_keep_changing_early_in_the_file_starve_the_frozen_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers trained only now and then (MoE experts, alternating blocks) that sort before the
    frozen ones: each save refers to pieces the previous save wrote, those are new to the round
    and come first in file order, so they take the whole budget every save and the round never
    ends; damage in the frozen tail is never found and spreads to every later checkpoint."""
    monkeypatch.setattr(writer, "SCRUB_MIN_BYTES", 0)
    monkeypatch.setattr(writer, "SCRUB_SHARE", 1 / 4)
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    g = torch.Generator().manual_seed(3)
    moving = {f"a{i}": torch.randn(1024, generator=g) for i in range(8)}
    frozen = {f"z{i}": torch.randn(1024, generator=g) for i in range(4)}
    with _ckpt(root, keep=sg.Keep(last=20)) as ck:
        box.d = {**moving, **frozen}
        ck.save(st, 1)
        _flip(_file(root, 1), _chunk(root, 1, "z3").offset + 9)
        for step in range(2, 14):  # 12 saves: three times the stated 4
            for i in range(8):
                if (i + step) % 2 == 0:  # half of them trained since the last save
                    moving[f"a{i}"] = moving[f"a{i}"] + 1
            box.d = {**moving, **frozen}
            ck.save(st, step)
    healed = [s for s in range(2, 14) if _own(root, s, "z3")]
    assert healed and healed[0] <= 1 + 4, "z3 never re-read in 12 saves"


def test_a_mostly_unchanged_save_reads_at_most_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: list[int]
) -> None:
    """Cost claim: "at most 1/8 of the state's bytes per save". One tensor larger than the
    budget (an embedding table that is most of the state) is read whole, every round: about
    every other save, several times the budget on average."""
    monkeypatch.setattr(writer, "SCRUB_MIN_BYTES", 0)
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    g = torch.Generator().manual_seed(5)
    state = {"emb": torch.randn(16384, generator=g)}
    state.update({f"s{i}": torch.randn(256, generator=g) for i in range(8)})
    state_bytes = sum(t.nbytes for t in state.values()) + 16
    budget = state_bytes / 8
    per_save = []
    with _ckpt(root) as ck:
        for step in range(1, 10):
            reads.clear()
            box.d = {**state, "head": torch.full((4,), float(step))}
            ck.save(st, step)
            if step > 1:
                per_save.append(sum(reads))
    # on average (a single save may overrun by less than one piece: that alone is no bug)
    assert sum(per_save) / len(per_save) <= budget, (per_save, budget)


def test_a_small_state_is_reread_whole_every_save(tmp_path: Path, reads: list[int]) -> None:
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0", "b1", "b2"])
    shared = sum(t.nbytes for t in base.values())
    with _ckpt(root) as ck:
        for step in range(1, 5):
            reads.clear()
            box.d = {**base, "head": torch.full((4,), float(step))}
            ck.save(st, step)
            assert sum(reads) == (shared if step > 1 else 0)


def test_everything_changed_reads_nothing_not_even_a_stat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(writer._Scrub, "__call__", lambda self, key: calls.append(key) or True)
    root = tmp_path / "run"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    with _ckpt(root) as ck:
        for step in range(1, 4):
            box.d = {k: v + step for k, v in _frozen(["b0", "b1"]).items()}
            ck.save_async(st, step).result()
    assert calls == []


# ---- the two-tier cache ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _moto() -> Iterator[str]:
    """moto's S3 server on loopback, once for this file (as tests/remote/conftest.py)."""
    pytest.importorskip("obstore")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


_buckets = iter(range(1 << 30))


@pytest.fixture
def s3_url(_moto: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<fresh bucket>/runs/exp`` with fake credentials in the environment."""
    boto3 = pytest.importorskip("boto3")
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": _moto,
        "AWS_ALLOW_HTTP": "true",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"sg-scrub-{os.getpid()}-{next(_buckets)}"
    boto3.client(
        "s3",
        endpoint_url=_moto,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    ).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs/exp"


@pytest.mark.network
def test_two_tier_cache_damage_is_healed_and_the_remote_restores(
    tmp_path: Path, s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0", "b1"])
    with _ckpt(s3_url, cache=cache, keep=sg.Keep(last=2)) as ck:
        for step in (1, 2, 3):
            box.d = {**base, "head": torch.full((8,), float(step))}
            ck.save(st, step)
        ck.wait()
        shared = _file(cache, 1)
        assert shared.exists(), sorted(p.name for p in cache.iterdir())
        _flip(shared, _chunk(cache, 3, "b1").offset + 4)
        with caplog.at_level(logging.WARNING, logger="savegame"):
            for step in (4, 5):
                box.d = {**base, "head": torch.full((8,), float(step))}
                ck.save(st, step)
    assert "bit rot" in caplog.text
    # step 4 wrote b1 in full (the cache keeps only step 5 now): step 5 refers to it
    assert _chunk(cache, 5, "b1").file == f"{layout.step_dir(4)}/{layout.tensor_file(0)}"
    b2 = Box()
    with _ckpt(s3_url, keep=sg.Keep(last=2)) as ck:
        assert ck.restore(sg.TrainState(box=b2, rng=False)) == 5
    for k, v in {**base, "head": torch.full((8,), 5.0)}.items():
        assert torch.equal(b2.d[k], v), k
    assert reader.verify(f"{s3_url}/{layout.step_dir(5)}") == []


# ---- two ranks over gloo, a sharded tensor ----------------------------------------------------------
#
# This file is also the ranks' script (``launch(..., worker=Path(__file__))``): each rank holds
# its half of a DTensor (Shard(0)) and a per-rank tensor; after step 2, rank 1 flips a byte of
# its shard in step 1's rank-00001 file; steps 3 and 4 follow with Keep(last=2).

SHARDED_ROWS = 64


def _sharded_full() -> torch.Tensor:
    return torch.randn(SHARDED_ROWS, 32, generator=torch.Generator().manual_seed(11))


def _rank_main() -> None:  # pragma: no cover - runs in the forked ranks
    import json
    import sys
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    args = json.loads(sys.argv[2])
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.environ['SG_TEST_STORE']}",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(seconds=60),
    )
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    extras = {
        "frozen": distribute_tensor(_sharded_full(), mesh, [Shard(0)]),
        "mine": torch.full((256,), float(rank + 1)),
        "moving": torch.zeros(16),
    }
    state = sg.TrainState(extras=extras, rng=False)
    root = Path(args["root"])
    logging.basicConfig(level=logging.WARNING)
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=2), handle_signals=False
    ) as ck:
        for step in range(1, 5):
            extras["moving"] = torch.full((16,), float(100 * rank + step))
            if step == 3:
                dist.barrier()
                if rank == 1:
                    m = reader.read_manifest(root / layout.step_dir(2))
                    mine = f"{layout.step_dir(1)}/{layout.tensor_file(1)}"
                    c = next(
                        c
                        for k, t in m.tensors.items()
                        if k.endswith("frozen")
                        for c in t.chunks
                        if c.file == mine
                    )
                    _flip(root / mine, c.offset + 3)
                    Path(args["out"], "flipped").write_text(str(c.offset))
                dist.barrier()
            ck.step(state, step)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_a_rotten_shard_on_rank_1_is_healed(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "distributed"))
    try:
        from _launch import launch
    finally:
        sys.path.pop(0)
    run = tmp_path / "run"
    launch("scrub", 2, {"root": str(run), "out": str(tmp_path)}, worker=Path(__file__))
    assert (tmp_path / "flipped").exists()
    refs = reader.list_checkpoints(run)
    assert [r.step for r in refs] == [3, 4], [r.step for r in refs]
    for r in refs:
        assert reader.verify(r.path) == [], r.step
    m3 = reader.read_manifest(run / layout.step_dir(3))
    frozen = [t for k, t in m3.tensors.items() if k.endswith("frozen")]
    files = sorted(c.file for t in frozen for c in t.chunks)
    # rank 1's shard was written in full at step 3; rank 0's is still shared with step 1
    assert files == sorted([f"{layout.step_dir(1)}/{layout.tensor_file(0)}", layout.tensor_file(1)])
    got = sg.load(run / layout.step_dir(4))
    assert torch.equal(got["extras"]["frozen"], _sharded_full())


def _fork_ranks(world: int) -> None:  # pragma: no cover - the launcher's process
    """tests/distributed/_worker.fork_ranks without its imports (FSDP2, dynamo: seconds on a
    2-core box that these ranks do not need): fork ``world`` ranks, print their exit codes."""
    import json
    import traceback

    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
            code = 0
            try:
                _rank_main()
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print("EXIT-CODES " + json.dumps(codes), flush=True)


if __name__ == "__main__":  # the ranks of test_two_ranks_…: see above
    import sys

    import torch.distributed.device_mesh
    import torch.distributed.tensor  # noqa: F401  (seconds: once, before the fork)

    _fork_ranks(int(sys.argv[3]))


@pytest.mark.network
def test_an_object_store_run_sends_no_request_for_the_scrub(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    real = reader.resolve

    def resolve(loc: Any, name: str) -> str:
        import traceback

        asked.append(f"{name} from {traceback.extract_stack(limit=2)[0].name}")
        return real(loc, name)

    box = Box()
    st = sg.TrainState(box=box, rng=False)
    base = _frozen(["b0", "b1"])
    with _ckpt(s3_url) as ck:
        box.d = {**base, "head": torch.zeros(8)}
        ck.save(st, 1)
        monkeypatch.setattr(reader, "resolve", resolve)
        box.d = {**base, "head": torch.ones(8)}
        ck.save(st, 2)
        monkeypatch.setattr(reader, "resolve", real)
    assert asked == []
