"""Child processes for tests/test_review_s33_environments.py (outside review S33E).

Everything that needs its own interpreter — another uid or capability set, a umask, a locale,
interpreter flags (``-O``, ``-I``, ``-X dev``, ``-W error``), a missing ``HOME`` or ``TMPDIR`` —
runs this file as ``python child.py COMMAND ARGS...``. Each command prints one JSON object on
its last line of stdout; the test asserts on it.

Commands:
    loop ROOT TOTAL [--async] [--workers N]
        README "Use it" loop (StatefulDataLoader over ``sg.data.resumable``, Adam, StepLR,
        ``Every(steps=4)``, ``Keep(last=2, best=1)``, metrics every 3 steps), run in two
        sessions: to TOTAL // 2, close, then a new Checkpointer restores and trains to TOTAL.
    resume ROOT
        Open ROOT, restore, save one more step; reports ``writable``, the steps and any error.
    probe-other RUN UNREADABLE NEWDIR ROCWD STALE TEAM
        What a user who is not the owner of RUN (readable) and UNREADABLE (mode 0700) can do;
        NEWDIR: where to fork RUN; ROCWD: a read-only working folder; STALE: a writable run
        folder with another user's lock file; TEAM: a run in a setgid team folder (``resume``
        of the last two).
    hostile SCRATCH
        The hostile-input basics (bad Keep/Every/step values, a truncated and an edited
        checkpoint); reports the exception (or warning) type each one gives.
    unicode ROOT...
        Save and restore runs whose folder names (``B:<hex>`` for raw bytes), module names,
        extras keys and metric names are non-ASCII; reports what came back.
    restore-nolease ROOT
        Restore ROOT with a SIGURG handler installed (documented: no read lease then, so the
        checkpoint is read with pread and staged, docs/format.md "Restore").
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
import warnings
from typing import Any

import torch

import savegame as sg

UNICODE_NAMES = ["断点续训", "🚀", "e\u0301", "\u05e9\u05dc\u05d5\u05dd"]


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=True) + "\n")
    sys.stdout.flush()


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc)[:600],
    }


def tiny_state(seed: int = 0) -> sg.TrainState:
    """A model and a dict (no optimizer: building one imports torch._dynamo, 1-4 s per child)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    return sg.TrainState(model=model, extras={"epoch": 0})


# ---- loop ------------------------------------------------------------------------------------
def cmd_loop(root: str, total_s: str, *opts: str) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    total = int(total_s)
    async_save = "--async" in opts
    workers = int(opts[opts.index("--workers") + 1]) if "--workers" in opts else 0

    def session(stop: int) -> tuple[int, float]:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(
            torch.randn(48, 4, generator=g), torch.randn(48, 1, generator=g)
        )
        loader = StatefulDataLoader(
            sg.data.resumable(data), batch_size=8, shuffle=True, num_workers=workers
        )
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1)
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, 5)
        extras = {"epoch": 0}
        ckpt = sg.Checkpointer(
            root,
            save=sg.Every(steps=4),
            keep=sg.Keep(last=2, best=1, monitor="val_loss", mode="min"),
            async_save=async_save,
        )
        state = sg.TrainState(
            model=model, optimizer=opt, scheduler=sched, loader=loader, extras=extras
        )
        step = ckpt.restore(state)
        while step < stop:
            for x, y in loader:
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                metrics = {"val_loss": loss.item()} if step % 3 == 0 else None
                ckpt.step(state, step, metrics=metrics)
                if step == stop:
                    break
            else:
                extras["epoch"] += 1
        ckpt.save(state, step)
        ckpt.close()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        return step, float(flat.double().sum())

    first, _ = session(total // 2)
    last, checksum = session(total)
    steps = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step-"))
    _emit({"first": first, "last": last, "checksum": checksum, "steps": steps})


# ---- resume ----------------------------------------------------------------------------------
def resume(root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    state = tiny_state()
    try:
        with sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=5)) as ck:
            out["writable"] = ck.writable
            step = ck.restore(state)
            out["restored"] = step
            state["model"].weight.data += 1
            try:
                ck.save(state, step + 1)
                out["saved"] = step + 1
            except Exception as exc:  # noqa: BLE001 - reported to the test
                out["save_error"] = _error(exc)
    except Exception as exc:  # noqa: BLE001
        out["open_error"] = _error(exc)
        out["traceback"] = traceback.format_exc()[-2000:]
    return out


def cmd_resume(root: str) -> None:
    _emit(resume(root))


# ---- probe-other -----------------------------------------------------------------------------
def cmd_probe_other(
    run: str, unreadable: str, newdir: str, rocwd: str, stale: str, team: str
) -> None:
    out: dict[str, Any] = {"stale": resume(stale), "team": resume(team)}
    steps = sorted(n for n in os.listdir(run) if n.startswith("step-"))
    newest = os.path.join(run, steps[-1])
    try:
        tree = sg.load(newest)
        out["load_keys"] = sorted(tree)
    except Exception as exc:  # noqa: BLE001
        out["load_error"] = _error(exc)

    state = tiny_state(seed=5)
    try:
        ck = sg.Checkpointer(run, save=sg.Every(steps=1))
        out["writable"] = ck.writable
        out["restored"] = ck.restore(state)
        out["weight"] = state["model"].weight.flatten().tolist()
        try:
            ck.save(state, 1000)
            out["saved"] = True
        except Exception as exc:  # noqa: BLE001
            out["save_error"] = _error(exc)
        try:
            ck.step(state, 1001)  # on schedule: a save too
            out["stepped"] = True
        except Exception as exc:  # noqa: BLE001
            out["step_error"] = _error(exc)
        ck.close()
        out["closed"] = True
    except Exception as exc:  # noqa: BLE001
        out["open_error"] = _error(exc)

    state2 = tiny_state(seed=6)
    try:
        with sg.Checkpointer(newdir, start_from=run, save=sg.Every(steps=1)) as fork:
            out["fork_restored"] = fork.restore(state2)
            fork.save(state2, out["fork_restored"] + 1)
        out["fork_steps"] = sorted(n for n in os.listdir(newdir) if n.startswith("step-"))
    except Exception as exc:  # noqa: BLE001
        out["fork_error"] = _error(exc)

    try:
        sg.Checkpointer(unreadable)
        out["unreadable_open"] = "opened"
    except Exception as exc:  # noqa: BLE001
        out["unreadable_open"] = _error(exc)
    try:
        with sg.open(os.path.join(unreadable, steps[-1])) as r:
            r.keys()
        out["unreadable_sg_open"] = "opened"
    except Exception as exc:  # noqa: BLE001
        out["unreadable_sg_open"] = _error(exc)
    try:
        sg.load(os.path.join(unreadable, steps[-1]))
        out["unreadable_load"] = "loaded"
    except Exception as exc:  # noqa: BLE001
        out["unreadable_load"] = _error(exc)

    os.chdir(rocwd)
    try:
        ck = sg.Checkpointer("runs/new", save=sg.Every(steps=1))
        ck.save(tiny_state(), 1)
        ck.close()
        out["rocwd"] = "saved"
    except Exception as exc:  # noqa: BLE001
        out["rocwd"] = _error(exc)
    _emit(out)


# ---- hostile ---------------------------------------------------------------------------------
def cmd_hostile(scratch: str) -> None:
    out: dict[str, str] = {}

    def rec(name: str, fn: Any) -> None:
        try:
            fn()
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001
            out[name] = type(exc).__name__

    rec("keep_float", lambda: sg.Keep(last=2.0))
    rec("keep_negative", lambda: sg.Keep(last=-1))
    rec("keep_bool", lambda: sg.Keep(last=True))
    rec("keep_no_mode", lambda: sg.Keep(best=1, monitor="foo"))
    rec("keep_bad_mode", lambda: sg.Keep(best=1, monitor="loss", mode="up"))
    rec("every_zero", lambda: sg.Every(steps=0))
    rec("every_float", lambda: sg.Every(steps=1.5))
    state = tiny_state()
    root = os.path.join(scratch, "run")
    ck = sg.Checkpointer(root, save=sg.Every(steps=1))
    rec("step_negative", lambda: ck.step(state, -1))
    rec("step_float", lambda: ck.step(state, 1.5))
    rec("step_str", lambda: ck.step(state, "3"))
    rec("step_bool", lambda: ck.step(state, True))
    rec("step_1", lambda: ck.step(state, 1))
    state["model"].weight.data += 1
    rec("step_2", lambda: ck.step(state, 2))
    state["model"].weight.data += 1
    rec("step_3", lambda: ck.step(state, 3))
    rec("step_backwards", lambda: ck.step(state, 2))
    rec("metric_str", lambda: ck.step(state, 4, metrics={"loss": "x"}))
    rec("only_str", lambda: ck.restore(state, only="model"))
    rec(
        "plain_loader",
        lambda: sg.TrainState(model=state["model"], loader=torch.utils.data.DataLoader([1, 2])),
    )
    ck.close()
    step2 = os.path.join(root, "step-000000000002")
    step3 = os.path.join(root, "step-000000000003")
    data = os.path.join(step3, "rank-00000.safetensors")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) - 4)
    rec("load_truncated", lambda: sg.load(step3))
    manifest = os.path.join(step2, "manifest.json")
    with open(manifest, encoding="utf-8") as f:
        doc = json.load(f)
    doc["step"] = 7
    with open(manifest, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    rec("load_edited", lambda: sg.load(step2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sg.Checkpointer(root) as ck2:
            out["restored"] = str(ck2.restore(tiny_state()))
    out["warnings"] = ",".join(sorted({type(w.message).__name__ for w in caught}))
    out["optimize"] = str(sys.flags.optimize)
    _emit(out)


# ---- unicode ---------------------------------------------------------------------------------
def _name(arg: str) -> str:
    return os.fsdecode(bytes.fromhex(arg[2:])) if arg.startswith("B:") else arg


def unicode_state(seed: int = 0) -> sg.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict({n: torch.nn.Linear(2, 2) for n in UNICODE_NAMES})
    extras = {n: i for i, n in enumerate(UNICODE_NAMES)}
    extras["值"] = "断点续训 🚀 e\u0301 \u05e9"
    return sg.TrainState(model=model, extras=extras)


def save_unicode_run(root: str, steps: int = 2) -> None:
    state = unicode_state()
    keep = sg.Keep(last=3, best=1, monitor="准确率_acc", mode="max")
    with sg.Checkpointer(root, save=sg.Every(steps=1), keep=keep) as ck:
        for step in range(1, steps + 1):
            for p in state["model"].parameters():
                p.data += 1
            ck.step(state, step, metrics={"准确率_acc": step / 10, "损失🚀": 1.0 / step})


def cmd_unicode(*roots: str) -> None:
    out: dict[str, Any] = {"fs_encoding": sys.getfilesystemencoding(), "runs": []}
    for arg in roots:
        root = _name(arg)
        rec: dict[str, Any] = {"root": os.fsencode(root).hex()}
        try:
            save_unicode_run(root)
            state = unicode_state(seed=9)
            extras = state["extras"]
            extras.clear()
            with sg.Checkpointer(root) as ck:
                rec["restored"] = ck.restore(state)
                rec["metrics"] = [sorted(c.metrics) for c in ck.list()]
            rec["extras"] = extras
            rec["module_keys"] = list(state["model"].state_dict())
            rec["weight_sum"] = float(sum(p.double().sum() for p in state["model"].parameters()))
            rec["listing"] = sorted(os.fsencode(n).hex() for n in os.listdir(os.fsencode(root)))
        except Exception as exc:  # noqa: BLE001
            rec["error"] = _error(exc)
            rec["traceback"] = traceback.format_exc()[-1500:]
        out["runs"].append(rec)
    _emit(out)


# ---- restore-nolease -------------------------------------------------------------------------
def cmd_restore_nolease(root: str) -> None:
    signal.signal(signal.SIGURG, lambda *_: None)  # documented: no read lease is taken then
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)
    state = sg.TrainState(model=model)
    out: dict[str, Any] = {}
    try:
        with sg.Checkpointer(root) as ck:
            out["restored"] = ck.restore(state)
    except Exception as exc:  # noqa: BLE001
        out["error"] = _error(exc)
    _emit(out)


def main() -> None:
    cmd, *args = sys.argv[1:]
    {
        "loop": cmd_loop,
        "resume": cmd_resume,
        "probe-other": cmd_probe_other,
        "hostile": cmd_hostile,
        "unicode": cmd_unicode,
        "restore-nolease": cmd_restore_nolease,
    }[cmd](*args)


if __name__ == "__main__":
    main()
