"""Review D18 of the lead's diff 20e2d64..HEAD: edge cases of the new checks (transfer's
retired-file shadowing, strict optimizer prechecks, adopt folders, the manifest cache)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import savegame as sg
from savegame.cli.main import main


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _rc(*args: str) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)


# --- transfer: refuse_shadowing(same=_is_retired) --------------------------------------------


def test_push_of_other_bytes_at_a_retired_step_is_refused(cwd, capsys):
    """transfer.md/incremental.md: a new step N must never stand in front of a retired
    step-N file that later checkpoints use; only the very same bytes may. Here run c is a
    copy of run a (same run id) whose step 1 was saved again with other weights."""
    torch.manual_seed(0)
    m = nn.Linear(16, 16)
    st = sg.TrainState(model=m)
    with sg.Checkpointer("a", keep=sg.Keep(last=5)) as c:
        c.save(st, 1)
        c.save(st, 2)  # step 2 shares step 1's bytes
    shutil.copytree("a", "c")
    shutil.rmtree("c/step-000000000001")
    shutil.rmtree("c/step-000000000002")
    with torch.no_grad():
        m.weight.add_(1.0)
    with sg.Checkpointer("c", keep=sg.Keep(last=5)) as c:
        c.save(st, 1)  # other bytes, same header (names, dtypes, shapes, offsets)
    assert _rc("push", "a", "b", "--step", "2", "--no-progress") == 0
    assert list(Path("b").glob("retired-step-000000000001-*"))
    try:
        rc = _rc("push", "c/step-000000000001", "b", "--no-progress")
    except sg.StepExistsError:
        rc = 1
    # Either refused, or (if accepted) b's step 2 must still read its own bytes.
    assert rc != 0 or _rc("verify", "b") == 0
    assert _rc("verify", "b") == 0


def test_push_of_the_same_step_after_a_later_one_is_accepted(cwd):
    """The case the change was made for: the same run's step 1 after its step 2."""
    torch.manual_seed(0)
    st = sg.TrainState(model=nn.Linear(16, 16))
    with sg.Checkpointer("a", keep=sg.Keep(last=5)) as c:
        c.save(st, 1)
        c.save(st, 2)
    assert _rc("push", "a", "b", "--step", "2", "--no-progress") == 0
    assert _rc("push", "a", "b", "--no-progress") == 0
    assert _rc("verify", "b") == 0


# --- strict restore: optimizer_misfit's moment-shape check --------------------------------------


def _lbfgs():
    torch.manual_seed(0)
    m = nn.ParameterList([nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 3))])
    return m, torch.optim.LBFGS(m.parameters(), lr=0.1)


def test_strict_restore_of_lbfgs_with_a_vector_first_parameter(cwd):
    """resume.md: the same objects by the same names resume; LBFGS keeps its whole state
    under parameter 0, its direction 'd' a flat vector of every parameter's elements."""
    m, opt = _lbfgs()
    x = torch.randn(5, 3)

    def closure():
        opt.zero_grad()
        loss = ((x @ m[1].T).sum(1) + (x * m[0]).sum(1)).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with sg.Checkpointer("run") as c:
        c.save(sg.TrainState(model=m, opt=opt), 1)
    m2, opt2 = _lbfgs()
    with sg.Checkpointer("run") as c:
        assert c.restore(sg.TrainState(model=m2, opt=opt2)) == 1
    assert torch.equal(opt2.state_dict()["state"][0]["d"], opt.state_dict()["state"][0]["d"])


class _Preconditioned(torch.optim.Optimizer):
    """A Shampoo-like custom optimizer: a 2-D parameter's state holds its row and column
    preconditioners (2-D, [rows, rows] and [cols, cols])."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                if not st:
                    st["left"] = torch.eye(p.shape[0])
                    st["right"] = torch.eye(p.shape[1])
                st["left"] += p.grad @ p.grad.T
                st["right"] += p.grad.T @ p.grad
                p -= g["lr"] * p.grad


def test_strict_restore_of_custom_optimizer_with_square_preconditioners(cwd):
    def make():
        torch.manual_seed(0)
        model = nn.Linear(3, 4, bias=False)
        return model, _Preconditioned(model.parameters())

    model, opt = make()
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    with sg.Checkpointer("run") as c:
        c.save(sg.TrainState(model=model, opt=opt), 1)
    model2, opt2 = make()
    with sg.Checkpointer("run") as c:
        assert c.restore(sg.TrainState(model=model2, opt=opt2)) == 1
    assert torch.equal(opt2.state[model2.weight]["left"], opt.state[model.weight]["left"])


# --- adopt: _refuse_existing_step ----------------------------------------------------------------


def test_adopt_at_a_step_only_the_remote_tier_has_is_refused_before_loading(cwd):
    """Commit 7667583 / resume.md: adopt at a step the run has is StepExistsError before
    anything loads. With cache=, the run is the remote one; a fresh cache (another machine,
    a cleared scratch disk) does not hold its steps."""
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(4, 4), "bias": torch.ones(4)}, "src.safetensors")
    torch.manual_seed(0)
    with sg.Checkpointer("remote", cache="cache1") as c:
        c.save(sg.TrainState(model=nn.Linear(4, 4)), 1)
    live = nn.Linear(4, 4)
    before = live.weight.detach().clone()
    raised = None
    try:
        with sg.Checkpointer("remote", cache="cache2") as c:
            try:
                c.adopt("src.safetensors", sg.TrainState(model=live), step=1, mapping={"model": ""})
            except sg.StepExistsError as exc:
                raised = ("adopt", exc)
    except sg.StepExistsError as exc:  # at close: the cached step is not uploaded
        raised = raised or ("close", exc)
    assert raised is not None and raised[0] == "adopt"
    assert torch.equal(live.weight.detach(), before)  # nothing loaded


def test_adopt_folder_paths_do_not_escape_and_a_bad_metric_loads_nothing(cwd):
    """adopt of a folder of files: a path's first part names a file directly in the folder
    ('..' is not one); a non-number metric is RestoreError before anything is loaded."""
    from safetensors.torch import save_file

    os.makedirs("ck")
    os.makedirs("outside")
    save_file({"weight": torch.ones(2, 2), "bias": torch.ones(2)}, "ck/model.safetensors")
    save_file({"weight": torch.full((2, 2), 7.0), "bias": torch.ones(2)}, "outside/model.safetensors")
    torch.save({"loss": torch.tensor(0.5), "s": "x"}, "ck/extra.pt")
    m = nn.Linear(2, 2)
    before = m.weight.detach().clone()
    with sg.Checkpointer("r1") as c:
        with pytest.raises(sg.CheckpointError):
            c.adopt("ck", sg.TrainState(model=m), step=1, mapping={"model": "../outside/model.safetensors"})
        with pytest.raises(sg.RestoreError, match="not a number"):
            c.adopt(
                "ck", sg.TrainState(model=m), step=1,
                mapping={"model": "model.safetensors"}, metrics={"loss": "extra.pt/s"},
            )
        assert torch.equal(m.weight.detach(), before)
        c.adopt(
            "ck", sg.TrainState(model=m), step=1,
            mapping={"model": "model.safetensors"}, metrics={"loss": "extra.pt/loss"},
        )
        assert torch.equal(m.weight.detach(), torch.ones(2, 2))
        with pytest.raises(sg.StepExistsError):
            c.adopt("ck", sg.TrainState(model=m), step=1, mapping={"model": "model.safetensors"})


def test_manifest_rewritten_in_place_is_read_again(cwd):
    """reader's version cache: a manifest edited in place (same size) is not served from the
    cache; verify sees the edit."""
    from savegame.engine import reader

    with sg.Checkpointer("run") as c:
        c.save(sg.TrainState(model=nn.Linear(2, 2)), 1)
    mpath = Path("run/step-000000000001/manifest.json")
    reader.read_manifest("run/step-000000000001")
    raw = mpath.read_bytes()
    st = os.stat(mpath)
    mpath.write_bytes(raw.replace(b'"step"', b'"stex"', 1))
    os.utime(mpath, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime moves
    with pytest.raises(sg.CheckpointError):
        reader.read_manifest("run/step-000000000001")
