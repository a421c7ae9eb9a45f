"""Review D19 of the lead's diff since 5f1b1e0 (writer scrub fallback, GPU bounce buffers,
bench_async changes). CPU-only: CUDA paths are exercised through their CPU-testable parts."""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.engine import reader, staging
from savegame.format import manifest

ROOT = Path(__file__).resolve().parent.parent


# ---- engine/staging.py bounce_plan: simulated on the host -------------------------------------
def _simulate(copies, size, nbufs):
    """Run bounce_plan's rounds as copy_to_device would (fill buffer k % n, then send)."""
    bufs = [torch.zeros(size, dtype=torch.uint8) for _ in range(nbufs)]
    rounds = staging.bounce_plan(copies, size, [b.data_ptr() for b in bufs])
    for k, (segments, sends) in enumerate(rounds):
        i = k % nbufs
        lo, hi = bufs[i].data_ptr(), bufs[i].data_ptr() + size
        for dst, src, n in segments:
            assert lo <= dst and dst + n <= hi, "a segment leaves its round's buffer"
            ctypes.memmove(dst, src, n)
        assert sum(n for _, _, n in segments) <= size
        for view, off, n in sends:
            assert off + n <= size
            view.copy_(bufs[i][off : off + n])
    return rounds


@pytest.mark.parametrize(
    ("sizes", "size", "nbufs"),
    [
        ([10, 0, 7, 33, 1], 8, 3),  # copies split across rounds, a zero-byte one between
        ([64], 8, 4),  # one copy over many rounds, buffers reused
        ([5, 5, 5], 64, 1),  # all in one round
        ([3, 13, 8, 8, 1], 8, 2),  # exact fills
    ],
)
def test_bounce_plan_moves_every_byte_to_its_place(sizes, size, nbufs):
    g = torch.Generator().manual_seed(0)
    srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
    dests = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    copies = [(d, s.data_ptr(), n) for d, s, n in zip(dests, srcs, sizes, strict=True) if n]
    rounds = _simulate(copies, size, nbufs)
    assert len(rounds) == -(-sum(sizes) // size)
    for d, s in zip(dests, srcs, strict=True):
        assert torch.equal(d, s)


def test_bounce_plan_into_a_two_dim_destination_view():
    # _copy_to_device_later hands _as_bytes(region) (a flat contiguous uint8 view), but a
    # contiguous multi-dim dest must also land in order (dest.reshape(-1) is a view)
    src = torch.arange(48, dtype=torch.uint8)
    big = torch.zeros(4, 12, dtype=torch.uint8)
    dest = big[1:3]  # contiguous rows of a larger tensor
    _simulate([(dest, src.data_ptr(), 24)], 5, 2)
    assert torch.equal(big[1:3].reshape(-1), src[:24])
    assert not big[0].any() and not big[3].any()


def test_copy_to_device_with_no_bytes_touches_no_cuda():
    # zero-byte copies only (empty tensors): nothing to do, and no CUDA call on a CPU machine
    staging.copy_to_device([])
    staging.copy_to_device([(torch.empty(0, dtype=torch.uint8), 0, 0)])


# ---- engine/reader.py fits / gpu_direct ---------------------------------------------------------
def test_fits_refuses_cuda_unless_direct_restore_is_on(monkeypatch):
    t = torch.zeros(2, 3)

    class E:  # the fields fits reads
        shape = (2, 3)
        dtype = "float32"

    monkeypatch.delenv("SAVEGAME_GPU_DIRECT_RESTORE", raising=False)
    assert not reader.gpu_direct()
    assert reader.fits(t, E)
    meta = torch.zeros(2, 3, device="meta")
    assert not reader.fits(meta, E)
    monkeypatch.setenv("SAVEGAME_GPU_DIRECT_RESTORE", "1")
    assert reader.gpu_direct()
    assert not reader.fits(meta, E)  # only cpu or cuda


# ---- benchmarks/bench_async.py: "every tensor changes before every timed method" --------------
@pytest.fixture
def bench_async(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_async as mod
    import torch.distributed as dist

    opened: list[sg.Checkpointer] = []
    init = sg.Checkpointer.__init__

    def tracked(self, *a, **kw):
        init(self, *a, **kw)
        opened.append(self)

    monkeypatch.setattr(sg.Checkpointer, "__init__", tracked)
    work = tmp_path / "work"
    monkeypatch.setattr(mod.tempfile, "mkdtemp", lambda prefix="": (work.mkdir(), str(work))[1])

    def small_state(gb):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        for p in model.parameters():
            p.grad = None
        return model, opt

    monkeypatch.setattr(mod, "build_state", small_state)
    monkeypatch.setattr(mod, "settle", lambda limit_s=20.0: None)
    monkeypatch.setattr(mod, "quiet_memory", lambda limit_s=8.0: None)  # a 2.5 s wait per restore
    try:
        yield mod
    finally:  # a run_one that raised left these behind
        for ck in opened:
            ck.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _moments_digest(state) -> str:
    h = hashlib.sha256()
    for s in state["optimizer"].state.values():
        for k in sorted(s):
            v = s[k]
            if isinstance(v, torch.Tensor) and k != "step":
                h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow  # CI under 20 minutes: run with -m slow
def test_bench_async_every_savegame_save_sees_changed_moments(bench_async, monkeypatch):
    seen: list[str] = []
    orig = sg.Checkpointer.save

    def spy(self, state, step, **kw):
        seen.append(_moments_digest(state))
        return orig(self, state, step, **kw)

    monkeypatch.setattr(sg.Checkpointer, "save", spy)
    rec = bench_async.run_one(0.001, 3, False, only="save|restore", device="cpu")
    assert not rec["failed"], rec["failed"]
    assert "restore-warm/savegame" in rec["median_s"]  # savegame's restore ran in every round
    # warm-up + 3 repeats: the docstring promises every tensor changed before every method
    assert len(seen) == 4
    assert len(set(seen)) == len(seen), "the optimizer moments did not change between saves"


def test_bench_async_a_failing_dcp_peer_is_reported_not_fatal(bench_async):
    # dcp.load of a checkpoint that was never written (dcp_save left out by `only`) fails the
    # way a DCP peer fails: torch.distributed.checkpoint.api.CheckpointException
    rec = bench_async.run_one(0.001, 1, False, only="sg_save|restore", device="cpu")
    assert "restore-warm/dcp.load" in rec["failed"]
    assert "restore-warm/savegame" in rec["median_s"]


# ---- engine/writer.py _Scrub._intact: a shared file retired between resolve and open ----------
class _Box:
    def __init__(self) -> None:
        self.d: dict[str, torch.Tensor] = {}

    def state_dict(self):
        return dict(self.d)

    def load_state_dict(self, sd):
        self.d = dict(sd)


def _retire_after_resolve(monkeypatch, root: Path, damage_at: int | None = None):
    """Make the scrub's resolve of step 1's file answer the folder's key, then retire that
    file (as retention on another thread would) before the scrub opens it."""
    from savegame.format import layout

    orig = reader.resolve
    moved = []

    def resolve(loc, name):
        key = orig(loc, name)
        if not moved and name.startswith(layout.step_dir(1) + "/"):
            src = root / layout.step_dir(1) / layout.tensor_file(0)
            dst = root / layout.retired_file(f"{layout.step_dir(1)}/{layout.tensor_file(0)}")
            src.rename(dst)
            if damage_at is not None:
                raw = bytearray(dst.read_bytes())
                raw[damage_at] ^= 0x40
                dst.write_bytes(bytes(raw))
            moved.append(dst)
        return key

    monkeypatch.setattr(reader, "resolve", resolve)
    return moved


def _chunk(root: Path, step: int, key: str) -> manifest.Chunk:
    from savegame.format import layout

    return reader.read_manifest(root / layout.step_dir(step)).tensors[f"box/{key}"].chunks[0]


@pytest.mark.parametrize("damaged", [False, True])
def test_scrub_reads_a_file_retired_between_resolve_and_open(
    tmp_path, monkeypatch, caplog, damaged
):
    import logging

    from savegame.format import layout

    root = tmp_path / "run"
    box = _Box()
    st = sg.TrainState(box=box, rng=False)
    g = torch.Generator().manual_seed(1)
    base = {f"base{i}": torch.randn(4096, generator=g) for i in range(3)}
    with sg.Checkpointer(
        root, save=sg.Every(steps=1), keep=sg.Keep(last=10), handle_signals=False
    ) as ck:
        box.d = {**base, "head": torch.zeros(4)}
        ck.save(st, 1)
        box.d = {**base, "head": torch.ones(4)}
        ck.save(st, 2)
        assert manifest.is_ref(_chunk(root, 2, "base1").file)
        c = _chunk(root, 1, "base1")
        moved = _retire_after_resolve(monkeypatch, root, c.offset + 5 if damaged else None)
        box.d = {**base, "head": torch.full((4,), 2.0)}
        with caplog.at_level(logging.WARNING, logger="savegame"):
            ck.save(st, 3)
        assert moved, "the race was not staged"
    own3 = not manifest.is_ref(_chunk(root, 3, "base1").file)
    if damaged:  # the retired copy's bad bytes are found, not trusted
        assert own3 and "bit rot" in caplog.text
        assert layout.retired_file(f"{layout.step_dir(1)}/{layout.tensor_file(0)}") in caplog.text
    else:  # moved, not lost: still shared, no damage reported
        assert not own3 and "damaged" not in caplog.text
        assert not manifest.is_ref(_chunk(root, 3, "head").file)
    assert reader.verify(root / layout.step_dir(3)) == []
    out = sg.load(root / layout.step_dir(3))
    assert torch.equal(out["box"]["base1"], base["base1"])
