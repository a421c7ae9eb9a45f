"""Edges of push / pull found at stop 30 and fixed at stop 31.

- ``steps=[]`` (nothing to move) leaves the destination as it was: not created, no run.json.
- A source checkpoint whose data file lies (a flipped byte) exits 1 from ``savegame push`` and
  ``savegame pull``, as one whose manifest does not parse: "a check found a damaged checkpoint"
  (savegame/cli/main.py), not bad input (2). The API still raises ``IntegrityError``.
- An object-store run holding an object whose key the store library cannot list (``run//x``,
  ``run/../x``: not written by savegame) fails with a typed error that names the key and says
  what to do, instead of only the library's parse error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame.cli.main import main as cli_main
from savegame.engine import reader
from savegame.tools.transfer import pull, push

DATA = "rank-00000.safetensors"


def _run(root: Path, steps: tuple[int, ...] = (1, 2)) -> sg.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    state = sg.TrainState(model=model, extras={"epoch": 0}, rng=False)
    with sg.Checkpointer(root) as ck:
        for s in steps:
            with torch.no_grad():
                model.weight.add_(1.0)
            ck.save(state, s)
    return state


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last byte: tensor data, not the header
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["local", "memory"])
def test_nothing_to_move_leaves_the_destination_untouched(tmp_path, how):
    src = tmp_path / "src"
    _run(src)
    dst = tmp_path / "dst" if how == "local" else f"memory://s31-empty-{tmp_path.name}/run"
    report = push(src, dst, steps=[])
    assert report.copied == () and report.skipped == () and report.verified
    if how == "local":
        assert not Path(dst).exists()
    else:
        assert reader.list_checkpoints(dst) == []
        with pytest.raises(sg.CheckpointNotFoundError):
            pull(dst, tmp_path / "back")  # nothing there, not even a run.json


def test_only_damaged_source_steps_write_no_run_json(tmp_path):
    src = tmp_path / "src"
    _run(src, steps=(1,))
    (src / "step-000000000001" / "manifest.json").write_bytes(b"{not json")
    dst = tmp_path / "dst"
    report = push(src, dst)
    assert not report.verified and report.copied == ()
    assert not dst.exists()


@pytest.mark.parametrize("verb", ["push", "pull"])
def test_cli_exits_1_for_a_source_file_that_lies(tmp_path, verb, capsys):
    src = tmp_path / "src"
    _run(src, steps=(1, 2))
    _flip(src / "step-000000000002" / DATA)
    dst = tmp_path / "dst"
    argv = [verb, str(src), str(dst)] if verb == "push" else [verb, src.as_uri(), str(dst)]
    with pytest.raises(sg.IntegrityError):
        (push if verb == "push" else pull)(src if verb == "push" else src.as_uri(), dst)
    code = cli_main([*argv, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "step-000000000002" in err and "error" in err
    # the good checkpoint moved, verified; the lying one did not
    assert [r.step for r in reader.list_checkpoints(dst) if r.valid] == [1]
    assert cli_main(["verify", str(dst)]) == 0


def test_cli_exit_is_the_same_for_a_lying_file_and_a_broken_manifest(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, steps=(1,))
    _run(b, steps=(1,))
    _flip(a / "step-000000000001" / DATA)
    (b / "step-000000000001" / "manifest.json").write_bytes(b"{not json")
    codes = [
        cli_main(["push", str(r), str(tmp_path / f"to-{r.name}"), "--no-progress"]) for r in (a, b)
    ]
    capsys.readouterr()
    assert codes == [1, 1]


@pytest.mark.network
@pytest.mark.parametrize("key", ["//x", "/../x", "/step-000000000002//x"])
def test_unlistable_key_in_an_s3_run_names_the_key_and_the_fix(tmp_path, s3_server, s3_url, key):
    import boto3

    src = tmp_path / "src"
    _run(src)
    push(src, s3_url)
    bucket, _, prefix = s3_url[len("s3://") :].partition("/")
    boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    ).put_object(Bucket=bucket, Key=prefix.rstrip("/") + key, Body=b"not savegame's")
    with pytest.raises(sg.StorageError) as info:
        with sg.Checkpointer(s3_url, cache=tmp_path / "cache") as ck:
            ck.restore(sg.TrainState(model=torch.nn.Linear(8, 8), rng=False))
    message = str(info.value)
    assert "delete or rename it" in message
    assert ("//" in message) or (".." in message)
