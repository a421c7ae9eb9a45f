"""Child for tests/test_outside_s17_saves.py: a save that fails from outside the library.

usage: fail_child.py ROOT MODE(sync|async) KIND(fsize|readonly)
Prints one JSON line with what each call did. ``fsize``: RLIMIT_FSIZE below the next save's
tensor file. ``readonly``: the run folder is chmod 0555 mid-run (run it without
CAP_DAC_OVERRIDE, e.g. under ``setpriv --bounding-set=-all``, when root).
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch

import savegame as sg


def main() -> None:
    root, mode, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    asyn = mode == "async"
    out: dict[str, object] = {}
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    extras: dict[str, object] = {"blob": torch.zeros(4)}
    state = sg.TrainState(model=model, extras=extras)
    ckpt = sg.Checkpointer(root, save=sg.Every(steps=1), keep=sg.Keep(last=10), async_save=asyn)
    try:
        ckpt.save(state, 1)
        if kind == "fsize":
            extras["blob"] = torch.randn(256 * 1024)  # 1 MiB
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
        else:
            os.chmod(root, 0o555)
        calls = []
        for s in (2, 3):
            entry: dict[str, object] = {"step": s}
            try:
                entry["returned"] = ckpt.step(state, s)
                if asyn:
                    ckpt.wait()
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                entry.update(
                    error=type(exc).__name__,
                    checkpoint_error=isinstance(exc, sg.CheckpointError),
                    oserror=isinstance(exc, OSError),
                    exc_step=getattr(exc, "step", None),
                    message=str(exc),
                )
            entry["listing"] = sorted(os.listdir(root))
            calls.append(entry)
        out["calls"] = calls
        # the problem is fixed
        if kind == "fsize":
            resource.setrlimit(
                resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            )
        else:
            os.chmod(root, 0o755)
        with torch.no_grad():
            model.weight.add_(1.0)
        try:
            out["after_fix"] = str(ckpt.save(state, 4))
        except Exception as exc:  # noqa: BLE001
            out["after_fix_error"] = f"{type(exc).__name__}: {exc}"
        out["weight"] = model.weight.detach().clone().flatten().tolist()
        out["blob"] = extras["blob"].flatten()[:4].tolist()  # type: ignore[union-attr]
        out["listing"] = sorted(os.listdir(root))
    finally:
        try:
            ckpt.close()
        except Exception as exc:  # noqa: BLE001
            out["close_error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
