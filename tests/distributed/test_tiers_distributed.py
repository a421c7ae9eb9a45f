"""Two tiers under torch.distributed (2 ranks, gloo on CPU): every rank uploads its own files
(the manifest's ``FileEntry.rank``), rank 0 commits the remote manifest last, and a job on a
fresh cache (another machine) restores the remote checkpoint on every rank.

This file is also the ranks' program (``launch(..., worker=THIS)``): run as a script it forks
the ranks.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

THIS = Path(__file__)


def _rank_main() -> None:
    import torch
    import torch.distributed as dist

    import savegame as sg
    from savegame.checkpointer import tiers

    args = json.loads(sys.argv[2])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.environ['SG_TEST_STORE']}",
        rank=int(os.environ["RANK"]),
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    rank = dist.get_rank()
    sent: list[list[str]] = []
    real = tiers.Tiers._send_files

    def spy(self: Any, *a: Any, **kw: Any) -> dict[str, int]:
        out: dict[str, int] = real(self, *a, **kw)
        sent.append(sorted(out))
        return out

    tiers.Tiers._send_files = spy  # type: ignore[method-assign]
    # "shared" is equal on every rank (written once, by rank 0); "mine" differs (per rank).
    extras: dict[str, Any] = {"shared": torch.zeros(256), "mine": torch.zeros(128)}
    state = sg.TrainState(rng=False, extras=extras)
    ckpt = sg.Checkpointer(
        args["remote"],
        cache=args["cache"],
        save=sg.Every(steps=1),
        keep=sg.Keep(last=2),
        handle_signals=False,
        async_save=bool(args.get("async_save")),
        upload_retry=tiers.UploadRetry(attempts=2, first_delay=0.01),
    )
    report: dict[str, Any] = {}
    start = ckpt.restore(state)
    report["start"] = start
    report["mine"] = float(extras["mine"][0])
    report["shared"] = float(extras["shared"][0])
    for step in range(start + 1, args["steps"] + 1):
        extras["shared"] = torch.full((256,), float(step))
        extras["mine"] = torch.full((128,), float(100 * rank + step))
        ckpt.step(state, step)
    ckpt.close()
    report["sent"] = sent
    Path(args["out"], f"report-{args['tag']}-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _fork_ranks(world: int) -> None:
    """``_worker.fork_ranks`` without its FSDP/dynamo imports (seconds per launch on a busy
    machine): import torch once, fork the ranks, print their exit codes for ``launch``."""
    import traceback

    import torch  # noqa: F401 - imported once, before the fork
    import torch.distributed  # noqa: F401

    import savegame  # noqa: F401

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
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print("EXIT-CODES " + json.dumps(codes), flush=True)


if __name__ == "__main__":
    _fork_ranks(int(sys.argv[3]))


@pytest.mark.distributed
@pytest.mark.parametrize("async_save", [False, True])
def test_every_rank_uploads_its_own_files_and_rank_0_commits_last(
    tmp_path: Path, async_save: bool
) -> None:
    from _launch import launch

    from savegame.engine import reader

    remote = tmp_path / "remote"
    run = {"remote": str(remote), "out": str(tmp_path), "async_save": async_save}
    launch(
        "save", 2, {**run, "cache": str(tmp_path / "cache-a"), "steps": 3, "tag": "a"}, worker=THIS
    )
    refs = reader.list_checkpoints(remote)
    assert [r.step for r in refs] == [2, 3] and all(r.valid for r in refs)
    m = refs[-1].manifest
    assert m is not None and m.world_size == 2
    assert {f: e.rank for f, e in m.files.items()} == {
        "rank-00000.safetensors": 0,
        "rank-00001.safetensors": 1,
    }
    assert reader.verify(refs[-1].path) == []
    sent = [json.loads((tmp_path / f"report-a-{r}.json").read_text())["sent"] for r in (0, 1)]
    assert sent[0] and all(files == ["rank-00000.safetensors"] for files in sent[0])
    assert sent[1] and all(files == ["rank-00001.safetensors"] for files in sent[1])
    assert [r.step for r in reader.list_checkpoints(tmp_path / "cache-a")] == [3]
    # Another machine: a fresh cache restores step 3 from the remote on both ranks.
    launch(
        "resume",
        2,
        {**run, "cache": str(tmp_path / "cache-b"), "steps": 4, "tag": "b"},
        worker=THIS,
    )
    for r in (0, 1):
        report = json.loads((tmp_path / f"report-b-{r}.json").read_text())
        assert report["start"] == 3
        assert report["mine"] == 100 * r + 3 and report["shared"] == 3
    assert [r.step for r in reader.list_checkpoints(remote)] == [3, 4]
