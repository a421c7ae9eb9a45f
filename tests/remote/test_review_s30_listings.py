"""Review S30L: every string that comes from a remote server is hostile.

A loopback HTTP server (``http_server``, with its listing answers replaced for some folders)
and moto's S3 (``s3_url``) hold hostile names; ``savegame ls / verify / pull`` and
``Checkpointer(start_from=URL)`` must write nothing outside DEST, raise only typed savegame
errors (or ignore the hostile entries), and stay bounded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame as sg
from savegame import errors
from savegame.cli.main import main as cli_main
from savegame.format import layout, manifest
from savegame.tools.transfer import pull

STEP1 = "step-000000000001"
STEP2 = "step-000000000002"
DATA = "rank-00000.safetensors"


# ---- helpers -----------------------------------------------------------------------------------
def _state(seed: int = 0) -> tuple[sg.TrainState, torch.nn.Module]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 4)
    return sg.TrainState(model=model, extras={"epoch": 0}, rng=False), model


def _make_run(root: Path, steps: tuple[int, ...] = (1,)) -> Path:
    st, model = _state()
    ck = sg.Checkpointer(root, handle_signals=False, keep=sg.Keep(last=50))
    for s in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ck.save(st, s)
    ck.close()
    return root


@pytest.fixture(scope="module")
def run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_run(tmp_path_factory.mktemp("tmpl") / "run", (1, 2))


class Hostile:
    """Wraps the HTTP server's WSGI app: ``answers[rel]`` = (content type, body) replaces what
    the server would send for the folder/file ``rel`` ("run/", "run/step-…/"); ``every_folder``
    answers every folder listing (a path ending in "/") under "run/"."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.answers: dict[str, tuple[str, bytes]] = {}
        self.every_folder: tuple[str, bytes] | None = None
        self.seen: list[str] = []
        inner = server._server.app

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
            raw = environ.get("PATH_INFO", "/")
            rel = raw.encode("latin-1").decode("utf-8", "replace").lstrip("/")
            self.seen.append(rel)
            ans = self.answers.get(rel)
            if (
                ans is None
                and self.every_folder is not None
                and rel.startswith("run/")
                and rel.endswith("/")
            ):
                ans = self.every_folder
            if ans is None:
                return inner(environ, start_response)
            ctype, body = ans
            start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
            return iter([] if environ["REQUEST_METHOD"] == "HEAD" else [body])

        server._server.app = app


@pytest.fixture
def www(http_server: Any, run_template: Path) -> tuple[Any, Hostile, str]:
    shutil.copytree(run_template, http_server.root / "run")
    return http_server, Hostile(http_server), f"{http_server.url}/run"


def _json_listing(entries: list[dict[str, Any]]) -> tuple[str, bytes]:
    return "application/json", json.dumps(entries).encode()


def _real_listing(server: Any, rel: str) -> list[dict[str, Any]]:
    folder = server.root / rel
    out = []
    for c in sorted(folder.iterdir()):
        if c.name.startswith("."):
            continue
        e: dict[str, Any] = {"name": c.name, "type": "directory" if c.is_dir() else "file"}
        if c.is_file():
            e["size"] = c.stat().st_size
        out.append(e)
    return out


def _html_listing(hrefs: list[str]) -> tuple[str, bytes]:
    body = (
        "<html><body><pre>"
        + "".join(f'<a href="{h}">x</a>\n' for h in hrefs)
        + "</pre></body></html>"
    )
    return "text/html", body.encode()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _typed_or_fine(fn: Callable[[], Any]) -> Any:
    """Run ``fn``: a typed savegame error or a result; anything else fails the test."""
    try:
        return fn()
    except errors.CheckpointError as exc:
        return exc


def _cli(*args: str) -> int:
    """The CLI in this process; a raw exception escapes it (what a user sees as a traceback)."""
    return cli_main([str(a) for a in args])


def _outside(tmp_path: Path) -> Path:
    """A sentinel folder beside DEST: nothing may appear in it."""
    p = tmp_path / "outside"
    p.mkdir(exist_ok=True)
    return p


def _restore(url: str, tmp_path: Path) -> int:
    st, _ = _state(5)
    ck = sg.Checkpointer(tmp_path / "new", start_from=url, handle_signals=False)
    try:
        return int(ck.restore(st))
    finally:
        ck.close()


def _boto(s3: Any) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                        aws_secret_access_key=s3.secret_key, region_name=s3.region)  # fmt: skip


def _resign(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a manifest with ``edit`` and re-sign it (its self-hash verifies)."""
    body = json.loads(path.read_bytes())
    body.pop("integrity")
    edit(body)
    body["integrity"] = {"algorithm": "xxh3-128", "hash": manifest._self_hash(body)}
    path.write_text(json.dumps(body))


def _rename_file(body: dict[str, Any], new: str) -> None:
    body["files"][new] = body["files"].pop(DATA)
    for t in body["tensors"].values():
        for c in t["chunks"]:
            if c["file"] == DATA:
                c["file"] = new


# ---- 1. HTTP listings: hostile names are ignored -------------------------------------------------
HOSTILE_NAMES = [
    "../x", "..", ".", "", "/etc/passwd", "step-000000000001/../../x", "a\nb",
    "step-000000000003\n", "step-000000000003\r", "step-00000000000\x003", "%2e%2e%2f",
    "..\\..\\x", "x" * 100_000, "http://evil/step-000000000004", "step-٠٠٠٠٠٠٠٠٠٠٠٥",
]  # fmt: skip


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_json_run_listing_with_hostile_names_is_ignored(
    www: Any, tmp_path: Path, kind: str
) -> None:
    server, hostile, url = www
    entries = _real_listing(server, "run")
    for n in HOSTILE_NAMES:
        e: dict[str, Any] = {"name": n, "type": kind}
        if kind == "file":
            e["size"] = 3
        entries.append(e)
    entries += entries[:2]  # duplicate entries
    hostile.answers["run/"] = _json_listing(entries)
    outside = _outside(tmp_path)
    assert _cli("ls", url) == 0
    assert _cli("verify", url) == 0
    rep = pull(url, tmp_path / "dest")
    assert sorted(rep.copied) == [1, 2] and rep.verified
    assert {p.split("/")[0] for p in _tree(tmp_path / "dest")} <= {
        ".lock",
        "LATEST",
        "run.json",
        "step-000000000001",
        "step-000000000002",
    }
    assert _restore(url, tmp_path) == 2
    assert _tree(outside) == set()


def test_html_run_listing_with_hostile_links_is_ignored(www: Any, tmp_path: Path) -> None:
    server, hostile, url = www
    hrefs = ["step-000000000001/", "step-000000000002/", "run.json", "LATEST", "%2e%2e/",
             "%2e%2e%2f", "%2e/", "a%0ab/", "step-000000000003%0a/", "step-000000000003%0d/",
             "x%00y/", "%2fetc%2fpasswd", "http://evil/step-000000000004/",
             "//evil/step-000000000004/", "step-000000000001/", "%ff%fe/", "..%5c..%5cx/",
             "step-000000000001%2f..%2f..%2fx", "x" * 100_000 + "/"]  # fmt: skip
    hostile.answers["run/"] = _html_listing(hrefs)
    outside = _outside(tmp_path)
    assert _cli("ls", url) == 0
    assert _cli("verify", url) == 0
    rep = pull(url, tmp_path / "dest")
    assert sorted(rep.copied) == [1, 2] and rep.verified
    assert _restore(url, tmp_path) == 2
    assert _tree(outside) == set()
    assert not any("evil" in r for r in hostile.seen)


def test_html_step_listing_with_dotdot_pull_and_restore_ignore_it(www: Any, tmp_path: Path) -> None:
    server, hostile, url = www
    names = [e["name"] for e in _real_listing(server, f"run/{STEP2}")]
    hostile.answers[f"run/{STEP2}/"] = _html_listing([*names, "%2e%2e/", "%2e/", "a%0ab"])
    outside = _outside(tmp_path)
    rep = pull(url, tmp_path / "dest")
    assert sorted(rep.copied) == [1, 2] and rep.verified
    assert _restore(url, tmp_path) == 2
    assert _tree(outside) == set()


@pytest.mark.parametrize("junk", ["names", "step_like"])
def test_100k_entry_listing(www: Any, tmp_path: Path, junk: str) -> None:
    server, hostile, url = www
    fmt = "junk-{}" if junk == "names" else "step-{:012d}\n"
    extra = [{"name": fmt.format(i), "type": "directory"} for i in range(3, 100_003)]
    hostile.answers["run/"] = _json_listing(_real_listing(server, "run") + extra)
    assert _cli("ls", url) == 0
    rep = pull(url, tmp_path / "dest")
    assert sorted(rep.copied) == [1, 2]
    assert _restore(url, tmp_path) == 2
    assert len(hostile.seen) < 200  # no request per junk entry


@pytest.mark.parametrize("body", ["binary_50mb", "json_object", "json_strings"])
def test_listing_that_is_not_a_listing(www: Any, tmp_path: Path, body: str) -> None:
    server, hostile, url = www
    hostile.answers["run/"] = {
        "binary_50mb": ("application/octet-stream", os.urandom(1 << 20) * 50),
        "json_object": ("application/json", b'{"name": "step-000000000001", "type": "directory"}'),
        "json_strings": ("application/json", b'["step-000000000001", null, 3, [], {}]'),
    }[body]
    assert _cli("ls", url) in (0, 2)
    with pytest.raises(errors.CheckpointNotFoundError):
        pull(url, tmp_path / "dest")
    with pytest.warns(UserWarning, match="holds no checkpoint"):
        assert _restore(url, tmp_path) == 0
    assert not (tmp_path / "dest").exists() or _tree(tmp_path / "dest") <= {".lock"}


def test_a_marker_naming_a_hostile_dest_hides_nothing_and_breaks_nothing(
    www: Any, tmp_path: Path
) -> None:
    """A ``.tmp-`` marker whose ``dest`` no save writes (``../../../x``) hides nothing: the run
    stays readable (it made every ls, pull and restore of the run a StorageError before)."""
    server, hostile, url = www
    marker = ".tmp-step-000000000002-abc"
    server.put(f"run/{marker}", json.dumps({"final": STEP2, "dest": "../../../x"}).encode())
    hostile.answers["run/"] = _json_listing(
        [*_real_listing(server, "run"), {"name": marker, "type": "file", "size": 10}]
    )
    outside = _outside(tmp_path)
    assert sorted(pull(url, tmp_path / "dest").copied) == [1, 2]
    assert _restore(url, tmp_path) == 2
    assert _cli("ls", url) == 0
    assert _tree(outside) == set()
    assert not any(r.startswith("x") for r in hostile.seen)


def test_symlink_loop_in_a_served_checkpoint(www: Any, tmp_path: Path) -> None:
    """A symbolic link loop on the web server (nginx follows links too): bounded by the
    server's ELOOP; verify reports the extra entry, pull and restore move the checkpoint."""
    server, _, url = www
    os.symlink(".", server.root / "run" / STEP2 / "loop")
    assert _cli("ls", url) == 0
    assert _cli("verify", url) == 1
    rep = pull(url, tmp_path / "dest")
    assert sorted(rep.copied) == [1, 2]
    assert not (tmp_path / "dest" / STEP2 / "loop").exists()
    assert _restore(url, tmp_path) == 2


# ---- 1b. HTTP listings: what the product gets wrong ----------------------------------------------
@pytest.mark.parametrize(
    "size",
    ["abc", None, [], float("inf"), "1" * 5000],
    ids=["str", "null", "list", "inf", "5000digits"],
)
def test_json_listing_entry_with_a_bad_size(www: Any, tmp_path: Path, size: Any) -> None:
    server, hostile, url = www
    entries = [*_real_listing(server, "run"), {"name": "junk", "type": "file", "size": size}]
    hostile.answers["run/"] = ("application/json", json.dumps(entries).encode())
    outside = _outside(tmp_path)
    try:
        rep = pull(url, tmp_path / "dest")
        assert sorted(rep.copied) == [1, 2]
    except errors.CheckpointError:
        pass
    assert _tree(outside) == set()


def test_deeply_nested_json_listing(www: Any, tmp_path: Path) -> None:
    server, hostile, url = www
    hostile.answers["run/"] = ("application/json", b"[" * 100_000 + b"]" * 100_000)
    try:
        pull(url, tmp_path / "dest")
    except errors.CheckpointError:
        pass


@pytest.mark.parametrize("op", ["ls", "verify", "restore"])
def test_server_with_a_page_for_every_folder(www: Any, tmp_path: Path, op: str) -> None:
    """Folders that do not exist (``run/manifest.json/``) answered with an index page of one
    sub-folder (a catch-all / SPA fallback, or a hostile server): every level is one more
    GET and one more Python frame."""
    server, hostile, url = www
    hostile.every_folder = _html_listing(["more/"])
    hostile.answers["run/"] = _html_listing(
        [
            e["name"] + ("/" if e["type"] == "directory" else "")
            for e in _real_listing(server, "run")
        ]
    )
    for d in (STEP1, STEP2):
        hostile.answers[f"run/{d}/"] = _html_listing(
            [e["name"] for e in _real_listing(server, f"run/{d}")]
        )
    try:
        if op == "restore":
            assert _restore(url, tmp_path) == 2
        else:
            assert _cli(op, url) in (0, 1, 2)
    except errors.CheckpointError:
        pass
    assert len(hostile.seen) < 200  # a bounded number of requests


@pytest.mark.parametrize("listing", ["json_dot", "json_dotdot", "html_pct_dotdot"])
def test_verify_of_a_checkpoint_listing_dot_entries(www: Any, tmp_path: Path, listing: str) -> None:
    server, hostile, url = www
    real = _real_listing(server, f"run/{STEP2}")
    hostile.answers[f"run/{STEP2}/"] = {
        "json_dot": _json_listing([*real, {"name": ".", "type": "directory"}]),
        "json_dotdot": _json_listing([*real, {"name": "..", "type": "directory"}]),
        "html_pct_dotdot": _html_listing([*(e["name"] for e in real), "%2e%2e/"]),
    }[listing]
    from savegame.engine import reader
    from savegame.storage import locate

    problems = reader.verify(locate(f"{url}/{STEP2}"))  # raw ValueError today
    assert isinstance(problems, list)


@pytest.mark.parametrize("name", [layout.LATEST, layout.RUN_FILE])
def test_huge_latest_or_run_json_is_not_read_whole(www: Any, tmp_path: Path, name: str) -> None:
    import tracemalloc

    server, _, url = www
    with open(server.root / "run" / name, "wb") as f:
        f.truncate(64 << 20)
    tracemalloc.start()
    try:
        try:
            pull(url, tmp_path / "dest")
        except errors.CheckpointError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"peak {peak >> 20} MiB for a 64 MiB {name}"


# ---- 2. S3 keys ----------------------------------------------------------------------------------
S3_KEYS = {
    "dotdot_inside_step": [f"{STEP1}/../../escape", f"{STEP2}/../../../escape2"],
    "trailing_slash": [f"{STEP1}/sub/", f"{STEP1}/", "dir//x"],
    "long": [f"{STEP1}/" + "x" * 1000],
}


@pytest.mark.parametrize("kind", sorted(S3_KEYS))
def test_s3_hostile_keys_pull_stays_in_dest(
    s3_url: str, s3_env: Any, tmp_path: Path, kind: str
) -> None:
    _make_run(s3_url, (1, 2))
    bucket, prefix = s3_url[5:].split("/", 1)
    c = _boto(s3_env)
    for k in S3_KEYS[kind]:
        c.put_object(Bucket=bucket, Key=f"{prefix}/{k}", Body=b"evil")
    outside = _outside(tmp_path)
    assert _cli("ls", s3_url) == 0
    assert _cli("verify", s3_url) == 1  # the foreign objects are reported
    rep = pull(s3_url, tmp_path / "dest")
    assert sorted(rep.copied) == [1, 2]
    assert _tree(tmp_path / "dest") == {
        ".lock", "LATEST", "run.json", STEP1, STEP2, f"{STEP1}/{layout.MANIFEST}",
        f"{STEP1}/{DATA}", f"{STEP2}/{layout.MANIFEST}", f"{STEP2}/{DATA}"}  # fmt: skip
    assert _restore(s3_url, tmp_path) == 2
    assert _tree(outside) == set()
    assert not any("escape" in str(p) for p in tmp_path.rglob("*"))


def test_s3_key_with_dotdot_at_run_level_is_a_typed_error(
    s3_url: str, s3_env: Any, tmp_path: Path
) -> None:
    _make_run(s3_url, (1, 2))
    bucket, prefix = s3_url[5:].split("/", 1)
    _boto(s3_env).put_object(Bucket=bucket, Key=f"{prefix}/../escape", Body=b"evil")
    outside = _outside(tmp_path)
    with pytest.raises(errors.StorageError):
        pull(s3_url, tmp_path / "dest")
    with pytest.raises(errors.StorageError):
        _restore(s3_url, tmp_path)
    assert _cli("ls", s3_url) == 2
    assert _tree(outside) == set()
    assert not any("escape" in str(p) for p in tmp_path.rglob("*"))


def test_s3_key_with_backslash_in_a_checkpoint_verify(
    s3_url: str, s3_env: Any, tmp_path: Path
) -> None:
    _make_run(s3_url, (1, 2))
    bucket, prefix = s3_url[5:].split("/", 1)
    _boto(s3_env).put_object(Bucket=bucket, Key=f"{prefix}/{STEP1}/..\\..\\escape", Body=b"evil")
    rep = pull(s3_url, tmp_path / "dest")  # pull is fine: it moves manifest names only
    assert sorted(rep.copied) == [1, 2]
    assert not any("escape" in str(p) for p in tmp_path.rglob("*"))
    assert _cli("verify", s3_url) == 1  # today: 2, "invalid storage key '..\\..\\escape'"


# ---- 3. A served manifest naming hostile files ---------------------------------------------------
HOSTILE_FILES = ["../../escape.safetensors", "/tmp/escape.safetensors", "..", ".hidden",
                 "a\nb.safetensors", "step-000000000001/../../escape.safetensors",
                 "step-000000000001/rank-00000.safetensors/../../../escape", "x" * 300,
                 "a\\..\\escape"]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE_FILES)
def test_served_manifest_with_hostile_file_name(www: Any, tmp_path: Path, name: str) -> None:
    server, _, url = www
    _resign(server.root / "run" / STEP2 / layout.MANIFEST, lambda b: _rename_file(b, name))
    outside = _outside(tmp_path)
    rep = pull(url, tmp_path / "dest")  # the whole run: step 2 is damaged, step 1 moves
    assert rep.copied == (1,) and not rep.verified and rep.problems
    assert not (tmp_path / "dest" / STEP2).exists()
    with pytest.raises(errors.FormatError):  # one checkpoint: refused
        pull(f"{url}/{STEP2}", tmp_path / "dest2")
    assert _tree(outside) == set()
    assert not any("escape" in str(p) for p in tmp_path.rglob("*"))
    assert not Path("/tmp/escape.safetensors").exists()
