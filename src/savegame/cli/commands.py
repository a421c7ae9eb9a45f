"""The ``savegame`` commands: each ``cmd_*`` takes the parsed arguments and returns the exit
status (see :mod:`savegame.cli.main` for the exit codes). Imported by ``main`` only once a
command runs, so that ``savegame --version`` and ``--help`` import neither rich nor the readers
(issue 9.18).

Invariant: the commands use the public API only — ``savegame`` (``sg.open``, ``sg.convert``,
``sg.diff``, ``sg.Keep``, the errors) and the run-folder functions of
:mod:`savegame.checkpointer` (``list_run``, retention's ``find_damage``/``delete_unkept``,
``run.json``, ``verify_checkpoint``), none of which imports torch — plus the reader's node types
(:mod:`savegame.interop.base`), :mod:`savegame.storage` (a URL's store) and
:mod:`savegame.tools.transfer` (push, pull). ``prune`` applies the same retention code as the
Checkpointer.

Every command takes a URL where it takes a path (issue 11): ``s3://``, ``gs://``, ``az://``,
``http(s)://`` (read-only: ``prune`` refuses), ``memory://``; ``file://`` is a local path. What is
printed shows a URL through :func:`savegame.storage.urls.redact` (``_text.clean`` redacts every
URL in what it prints), so credentials (``user:pass@``, ``?token=…``) are never shown.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

import savegame as sg
from savegame.cli import main
from savegame.cli._text import clean, lit, text
from savegame.format import layout
from savegame.interop.base import Opaque, TensorRef
from savegame.storage import Location, Store

if TYPE_CHECKING:
    from savegame.checkpointer import CheckpointInfo

Where = Path | Store  # a command's run or checkpoint: a local path, or a URL's store

__all__ = [
    "cmd_convert",
    "cmd_demo",
    "cmd_diff",
    "cmd_ls",
    "cmd_plot",
    "cmd_prune",
    "cmd_pull",
    "cmd_push",
    "cmd_show",
    "cmd_verify",
]

# Imports are per command (issue 9.18): `show`/`verify` of a foreign file need neither torch nor
# the run-folder code; convert/diff/demo import torch when they run.


def _runs() -> Any:
    """:mod:`savegame.checkpointer`, the public run-folder functions (``list_run``, retention,
    ``run.json``, ``verify_checkpoint``; none imports torch), imported on use."""
    from savegame import checkpointer

    return checkpointer


def _console() -> Console:
    """The output console, ``savegame.cli.main.console`` (made there on first use; tests and
    embedders may replace it)."""
    return main.console  # type: ignore[no-any-return]


def _size(n: int) -> str:
    v = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if v < 1024 or unit == "TB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"


def _options(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Reader options for a file given on the command line: the darknet cfg and --partial, and
    Keras/HDF5 files read in a child process first (libhdf5 can crash or hang on hostile
    files), unless --no-isolate. Each reader ignores the options meant for other formats."""
    opts: dict[str, Any] = {"isolate": not args.no_isolate, **extra}
    if args.cfg:
        opts["cfg"] = args.cfg
    opts.setdefault("partial", getattr(args, "partial", False))
    return opts


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _metrics(m: Any) -> str:
    return ", ".join(f"{_name(k)}={v:.4g}" for k, v in m.items()) or "-"


def _name(key: object) -> str:
    """A name from a file (a metric, an extras key) as shown: at most 200 characters, the rest
    counted (a name is never that long; a hand-made one must not make a column or a line of
    hundreds of kilobytes)."""
    return sg.errors.quoted(key, 200)


def refuse_checkpoint(root: Path | Store | str, is_checkpoint: bool, instead: str) -> None:
    """The run-folder commands (ls, prune, plot) given one checkpoint: say what to run instead
    (and never write a lock file into it)."""
    if not is_checkpoint:
        return
    if isinstance(root, Store):
        # A manifest.json that answered a HEAD may be a web page (a sign-in page a server
        # sends for every path): "one checkpoint" would send the user the wrong way.
        from savegame.engine import reader

        try:
            reader.read_manifest(Location(root, ""))
        except sg.FormatError as exc:
            raise sg.CheckpointNotFoundError(
                f"{printable(root)} is not a run folder, and its {layout.MANIFEST} is not a "
                f"savegame manifest either: {exc}",
                path=printable(root),
            ) from None
    raise sg.CheckpointNotFoundError(
        f"{printable(root)} is one checkpoint, not a run folder; {instead}",
        path=printable(root),
    )


# ---- where an argument points: a local path or a URL -------------------------------------------
def _is_remote(arg: str) -> bool:
    """A URL of a store (``file://`` is a local path)."""
    from savegame.storage import urls

    return urls.is_url(arg) and not urls.is_file_url(arg)


def _local(arg: str) -> Path:
    """A path argument as a Path (a ``file://`` URL too)."""
    from savegame.storage import urls

    if urls.is_file_url(arg):
        return Path(urls.file_path(arg))
    return Path(arg)


def _where(arg: str) -> Where:
    """A local path, or the store a URL names (connecting to it checks the scheme, the bucket
    name and the credentials given in the URL: typed errors naming the redacted URL)."""
    if _is_remote(arg):
        from savegame.storage import as_store

        return as_store(arg)
    return _local(arg)


def printable(where: Path | Store | Location | str) -> str:
    """How a path, store, location or URL is printed: a store's URL without credentials."""
    if isinstance(where, Store):
        return where.describe()
    if isinstance(where, str):
        from savegame.storage import urls

        return urls.redact(where)
    return str(where)  # a Location prints its store's (redacted) URL and its key


def _parent(arg: str, where: Where) -> str:
    """The folder holding ``where`` (the run of a checkpoint), for the messages that name it."""
    if isinstance(where, Path):
        return str(where.parent)
    return printable(arg).split("?", 1)[0].rstrip("/").rsplit("/", 1)[0]


def _is_checkpoint(where: Where) -> bool:
    if isinstance(where, Path):
        return bool(_runs().is_checkpoint(where))
    return where.exists(layout.MANIFEST) and not where.is_dir(layout.MANIFEST)


def _is_run(where: Where) -> bool:
    """A run folder: ``run.json``, or step / set-aside / temp checkpoint folders in it."""
    if isinstance(where, Path):
        return bool(_runs().is_run(where))
    if _is_checkpoint(where):
        return False
    if where.exists(layout.RUN_FILE):
        return True
    try:
        entries = where.list("")
    except (FileNotFoundError, NotADirectoryError):
        return False
    prefixes = ("step-", layout.DAMAGED_PREFIX + "step-", layout.TMP_PREFIX + "step-")
    return any(e.name.startswith(prefixes) for e in entries)


def _checkpoint_at(arg: str, where: Where) -> Path | Location:
    """The checkpoint ``arg`` names, as what ``sg.open`` and ``verify_checkpoint`` take."""
    if isinstance(where, Path):
        return where
    from savegame.storage import locate

    return locate(arg)


def run_at(arg: str, instead: str) -> Where:
    """The run folder a RUN argument names, for the commands that read one (ls, plot).

    One checkpoint is refused with ``instead`` (what to run; ``{shown}`` and ``{parent}`` are
    filled in), and a URL with no run there gets :func:`_nothing_at` (a local folder's absence
    is each command's to report)."""
    root = _where(arg)
    refuse_checkpoint(
        root,
        _is_checkpoint(root),
        instead.format(shown=printable(root), parent=_parent(arg, root)),
    )
    if isinstance(root, Store) and not _is_run(root):
        raise _nothing_at(arg)
    return root


def _nothing_at(arg: str) -> sg.CheckpointNotFoundError:
    shown = printable(arg)
    return sg.CheckpointNotFoundError(
        f"{shown}: no run folder or checkpoint there (nothing named step-…, no run.json, no "
        "manifest.json); check the URL",
        path=shown,
    )


# ---- ls ----------------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    runs = _runs()
    root = run_at(
        args.run,
        "see it with `savegame show {shown}`, or list its run with `savegame ls {parent}`",
    )
    infos = runs.list_run(root, _keep_from_args(args, root), aside=True)
    ckpts = [i for i in infos if i.kind == "checkpoint"]
    aside = [i for i in infos if i.kind == "damaged"]
    leftovers = [i for i in infos if i.kind == "leftover"]
    retired = [i for i in infos if i.kind == "retired"]
    run_problem = runs.run_file_problem(root)
    problems: dict[Path | Location, list[str]] = {}
    if args.verify:
        problems = {i.path: runs.verify_checkpoint(i.path) for i in ckpts if i.valid}
    title = f"{printable(root)}  ({len(ckpts)} checkpoints"
    if aside:
        title += f", {len(aside)} damaged set aside"
    if leftovers:
        title += f", {len(leftovers)} leftover temp folder{'s' if len(leftovers) > 1 else ''}"
    if retired:
        title += f", {len(retired)} retired file{'s' if len(retired) > 1 else ''} of shared bytes"
    # The title is its own line, never wrapped: a table title wraps at the table's width,
    # cutting a long path (or "leftover temp folder") in two.
    _console().print(text(title + ")"), soft_wrap=True)
    table = Table()
    # own: bytes in the checkpoint's folder (summed over the run, each byte counts once);
    # shared: bytes it refers to in earlier folders (incremental saves, docs/incremental.md).
    # Nothing is cut (a pipe or a file gets 80 columns): a cell too narrow wraps, and the
    # metrics column is at least as wide as its longest "name=value", so every value stays whole.
    longest = max((len(w) for i in ckpts for w in _metrics(i.metrics).split()), default=0)
    for col in ("step", "time", "own", "shared", "metrics", "kept because", "valid"):
        table.add_column(
            col,
            justify="right" if col in ("step", "own", "shared") else "left",
            overflow="fold",
            min_width=min(longest, 40) if col == "metrics" else None,
        )
    notes: list[str] = []
    bad = 0
    for i in ckpts:
        found = ([i.error] if i.error else []) + problems.get(i.path, [])
        notes.extend(f"step {i.step}: {p}" for p in found)
        if found:
            bad += 1
        why = _why_kept(i, found, run_problem is not None)
        ok = Text("NO", style="red") if found else Text("yes", style="green")
        table.add_row(
            str(i.step), _when(i.created), _size(i.own), _size(i.shared) if i.shared else "-",
            text(_metrics(i.metrics)), why, ok,
        )  # fmt: skip
    for i in retired:
        table.add_row(
            str(i.step), _when(i.created), _size(i.own), "-", "-",
            Text("retired file, shared with later checkpoints", style="cyan"), Text("-"),
        )  # fmt: skip
        notes.append(f"{i.path.name}: {i.error}")
    for i in aside:
        table.add_row(
            str(i.step), _when(i.created), _size(i.own), "-", "-",
            Text("damaged, set aside (never restored or counted)", style="red"), Text("NO", style="red"),
        )  # fmt: skip
        notes.append(f"{i.path.name}: {i.error}")
    for i in leftovers:
        table.add_row(
            "-", _when(i.created), _size(i.own), "-", "-",
            Text("temp folder (save in progress or interrupted)", style="yellow"), Text("-"),
        )  # fmt: skip
        notes.append(f"{i.path.name}: {i.error}")
    _print_whole(table)
    if not infos:
        _console().print("no checkpoints yet")
    if run_problem:
        notes.insert(0, run_problem)
    for note in notes:
        _console().print(text(note), soft_wrap=True)
    advice = _advice(root, ckpts, args.mtbf)
    if advice:
        _console().print(text(advice), soft_wrap=True)
    if not args.verify:
        _console().print(
            "[dim]valid = manifest checked; add --verify to check every tensor hash[/]"
        )
    return 1 if args.verify and (bad or run_problem) else 0


def _advice(root: Where, ckpts: list[CheckpointInfo], mtbf: float | None) -> str | None:
    """The interval advice line from the run's newest valid checkpoint (docs/policies.md)."""
    import time

    from savegame.policy import advice

    mine = [i for i in ckpts if i.valid and i.ours]
    if not mine:
        return None
    try:
        with sg.open(max(mine, key=lambda i: i.step).path) as r:
            record = r.metadata()["info"].get("advice")
    except sg.CheckpointError:  # damaged since listed: the table already says so
        return None
    run_record = _runs().read_run_file(root) or {}
    # the newest checkpoint records the estimates of the saves before it; run.json those a
    # session ended with (its last save included): the one that counts more saves
    record = advice.most_saves(record, run_record.get("advice"))
    sessions = run_record.get("sessions")
    return advice.summary(record, sessions, time.time(), mtbf=mtbf)  # type: ignore[no-any-return]


def _why_kept(i: CheckpointInfo, found: list[str], run_file_damaged: bool) -> Text:
    """The "kept because" cell: a damaged checkpoint of this run is "damaged", not "not ours"."""
    if not i.valid:  # the manifest does not parse: no run id to compare, and never restorable
        return Text("damaged (not restorable, not counted by retention)", style="red")
    if found:
        return Text(
            "damaged" + (f" ({', '.join(i.kept_for)})" if i.kept_for and i.ours else ""),
            style="red",
        )
    if not i.ours:
        return Text("unknown: run.json damaged" if run_file_damaged else "not ours", style="yellow")
    if i.kept_for:
        return text(", ".join(i.kept_for))
    return Text("would be pruned", style="dim")


# ---- plot --------------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    """``savegame plot``: :mod:`savegame.cli.plot`."""
    from savegame.cli import plot

    return plot.cmd_plot(args)


# ---- show --------------------------------------------------------------------------------------
def cmd_show(args: argparse.Namespace) -> int:
    path: Path | Location
    if _is_remote(args.path):
        path = _remote_checkpoint(args.path, newest=True)
    else:
        path = _local(args.path)
        runs = _runs() if path.is_dir() else None  # a file is never a run: no run-folder code
        if runs is not None and runs.is_run(path):
            path = _newest_valid(path)
        elif path.name in (layout.RUN_FILE, layout.LATEST, layout.LOCK) and path.is_file():
            if _runs().is_run(path.parent):
                run = printable(path.parent)
                raise sg.UnsupportedFormatError(
                    f"{printable(path)} is the run's own {path.name} file, not a checkpoint: "
                    f"`savegame ls {run}` lists the run, `savegame show {run}` shows its newest "
                    "checkpoint",
                    path=printable(path),
                )
    # Listing is harmless: unknown pickled objects are listed as opaque (never built), and a
    # partial darknet file is opened and said to be partial.
    with sg.open(path, **_options(args, listing=True, partial=True)) as r:
        meta = r.metadata()
        title = Text.assemble((clean(path), "bold"), f" ({clean(r.format)})")
        if "step" in meta:
            title.append(f"  step {clean(meta['step'])}")
        if meta.get("metrics"):
            title.append("  " + clean(_metrics(meta["metrics"])))
        root = Tree(title)
        infos = {k: r.info(k) for k in r.keys()}
        _render(root, r.tree(), infos, depth=0, max_items=args.max_items)
        _console().print(root)
        total = sum(i.nbytes for i in infos.values())
        _console().print(f"{len(infos)} tensors, {_size(total)}")
        cover = getattr(r, "coverage", None)
        if cover is not None:
            style = "" if cover.complete else "yellow"
            note = "" if cover.complete else " (a partial file: the other layers are not in it)"
            _console().print(Text(f"{cover}{note}", style=style))
    return 0


def _no_valid(root: Where, any_checkpoint: bool) -> str:
    shown = printable(root)
    if not any_checkpoint:
        return f"{shown}: no checkpoints yet (nothing has been committed in this run folder)"
    return f"{shown} holds no valid checkpoint; run `savegame ls {shown}` to see why"


def _newest_valid(root: Where) -> Path | Location:
    # Any rule will do: only the checkpoints and their validity are used (not run.json's).
    infos = _runs().list_run(root, sg.Keep())
    valid = [i for i in infos if i.valid]
    if not valid:
        raise sg.CheckpointNotFoundError(_no_valid(root, bool(infos)), path=printable(root))
    return valid[-1].path  # type: ignore[no-any-return]


def _remote_checkpoint(url: str, *, newest: bool) -> Location:
    """The savegame checkpoint a URL names: itself, or (``newest``) a run's newest valid one."""
    store = _where(url)
    assert isinstance(store, Store)
    if _is_checkpoint(store):
        return _checkpoint_at(url, store)  # type: ignore[return-value]
    if newest and _is_run(store):
        return _newest_valid(store)  # type: ignore[return-value]
    raise _nothing_at(url)


def _leaf_text(v: Any) -> str:
    t = repr(v)
    return t if len(t) <= 80 else t[:77] + "..."


def _render(
    node: Tree, obj: Any, infos: dict[str, sg.TensorInfo], depth: int, max_items: int
) -> None:
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    else:
        node.add(_describe(obj, infos))
        return
    for i, (k, v) in enumerate(items):
        if i >= max_items:
            node.add(Text(f"... {len(items) - max_items} more", style="dim"))
            break
        if (
            isinstance(v, (list, tuple))
            and len(v) > 8
            and all(isinstance(x, (int, float)) for x in v)
        ):
            node.add(text(f"{_name(k)}: {type(v).__name__} of {len(v)} numbers"))
        elif isinstance(v, (dict, list, tuple)) and v and not _is_flat(v):
            child = node.add(text(_name(k), style="bold"))
            _render(child, v, infos, depth + 1, max_items)
        else:
            node.add(Text.assemble(clean(_name(k)), ": ", _describe(v, infos)))


def _is_flat(v: Any) -> bool:
    seq = v.values() if isinstance(v, dict) else v
    return len(v) <= 8 and all(isinstance(x, (int, float, str, bool, type(None))) for x in seq)


def _describe(v: Any, infos: dict[str, sg.TensorInfo]) -> Text:
    if isinstance(v, TensorRef):
        i = infos.get(v.name)
        if i is None:
            return text(f"tensor {v.name}", style="cyan")
        return Text.assemble((clean(f"{i.dtype}{list(i.shape)}"), "cyan"), f" {_size(i.nbytes)}")
    if isinstance(v, Opaque):
        return text(f"<opaque {v.module}.{v.qualname}>", style="magenta")
    return text(_leaf_text(v))


# ---- verify ------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    runs = _runs()
    if _is_remote(args.path):
        store = _where(args.path)
        if _is_run(store):
            return _verify_run(store)
        loc = _checkpoint_at(args.path, store)
        # A step-named folder with something in it (an interrupted save) is a finding (1);
        # no folder at all is nothing at the path (2), as for show.
        if not (_is_checkpoint(store) or (_looks_like_step(loc.name) and _has_entries(store))):
            raise _nothing_at(args.path)
        problems = runs.verify_checkpoint(loc)
        _report(loc, problems)
        return 1 if problems else 0
    path = _local(args.path)
    if runs.is_run(path):
        return _verify_run(path)
    # A step-named folder with something in it (an interrupted save) is a finding (1); no
    # such folder is nothing at the path (2, from sg.open below, as for a missing file).
    if runs.looks_like_checkpoint(path) and (path.exists() or path.is_symlink()):
        problems = runs.verify_checkpoint(path)
    elif path.is_file() and runs.looks_like_checkpoint(path.parent):
        # A file of a savegame checkpoint: its hashes are in the manifest beside it, which a
        # check of the file alone (as a plain safetensors file) would never read.
        _console().print(
            text(f"{path.name} is a file of checkpoint {path.parent}: checking the checkpoint")
        )
        path = path.parent
        problems = runs.verify_checkpoint(path)
    else:
        with sg.open(path, **_options(args, partial=True)) as r:
            problems = r.verify()
            cover = getattr(r, "coverage", None)
            if cover is not None:
                _console().print(text(f"{path}: {cover}"))
                if not cover.complete and not args.partial:
                    problems = [
                        f"the file holds {cover.present} of the {cover.total} layers with "
                        "weights that its cfg describes: a cut file or the wrong cfg; if it is "
                        "partial on purpose (a backbone), add --partial",
                        *problems,
                    ]
    _report(path, problems)
    return 1 if problems else 0


def _verify_listed(root: Where, path: Path | Location) -> list[str] | None:
    """The problems of checkpoint ``path`` of run ``root``, or None when retention deleted it
    while it was checked (a run in use): a failure counts only if the checkpoint is still
    listed after it, and it is checked twice (a shared file may be retired under a read)."""
    problems: list[str] = []
    for _ in range(2):
        problems = _runs().verify_checkpoint(path)
        if not problems:
            return problems
        try:
            listed = any(
                i.kind == "checkpoint" and i.path.name == path.name for i in _runs().list_run(root)
            )
        except (OSError, sg.CheckpointError):
            return problems  # cannot tell: the finding stands
        if not listed:
            return None
    return problems


def _has_entries(store: Store) -> bool:
    try:
        return bool(store.list(""))
    except OSError:  # no such folder (a local one), or the listing failed: verify says which
        return False


def _looks_like_step(name: str) -> bool:
    """Named like a checkpoint (``step-…``, ``damaged-step-…``) whose manifest may be missing."""
    return layout.parse_step_dir(name) is not None or layout.parse_damaged_dir(name) is not None


def _report(path: Path | Location | str, problems: list[str]) -> None:
    if problems:
        _console().print(f"[red]FAIL[/] {lit(path)}", soft_wrap=True)
        for p in problems:
            _console().print(text(f"     {p}"), soft_wrap=True)
    else:
        _console().print(f"[green]ok[/]   {lit(path)}", soft_wrap=True)


def _verify_run(root: Where) -> int:
    """Every checkpoint of a run, plus its ``run.json``; damaged checkpoints already set aside
    and leftover temp folders are listed, not counted: restore never uses them."""
    runs = _runs()
    infos = runs.list_run(root, aside=True)
    ckpts = [i for i in infos if i.kind == "checkpoint"]
    bad = 0
    run_problem = runs.run_file_problem(root)
    if run_problem:
        _report(runs.run_file(root), [run_problem])
    gone = 0
    for i in ckpts:
        problems = _verify_listed(root, i.path)
        if problems is None:  # a run in use: retention deleted it while it was read
            gone += 1
            _console().print(f"[cyan]gone[/] {lit(i.path)}", soft_wrap=True)
            _console().print(text("     deleted by retention during the check"), soft_wrap=True)
            continue
        bad += bool(problems)
        _report(i.path, problems)
    checked = len(ckpts) - gone
    for i in infos:
        if i.kind != "checkpoint":
            label = {"damaged": "[red]set aside[/]", "retired": "[cyan]retired[/]"}.get(
                i.kind, "[yellow]leftover[/]"
            )
            _console().print(f"{label} {lit(i.path)}", soft_wrap=True)
            _console().print(text(f"     {i.error}"), soft_wrap=True)
    if not ckpts:
        _console().print(text(f"no checkpoints yet in {printable(root)}"), soft_wrap=True)
    if bad or run_problem:
        said = [f"{bad} of {checked} checkpoints have problems"] if bad else []
        said += ["run.json is damaged"] if run_problem else []
        _console().print(f"[red]{'; '.join(said)}[/]")
        return 1
    if checked:
        _console().print(f"[green]all {checked} verified[/]")
    return 0


# ---- convert, diff -----------------------------------------------------------------------------
def _source_arg(arg: str) -> str:
    """A checkpoint argument for ``sg.convert`` / ``sg.diff``: a URL as given (they read URLs
    of savegame runs and checkpoints), a ``file://`` URL as its path."""
    return arg if _is_remote(arg) else str(_local(arg))


def cmd_convert(args: argparse.Namespace) -> int:
    if _is_remote(args.dst):
        shown = printable(args.dst)
        raise sg.UnsupportedURLError(
            f"{shown}: convert writes a local file or folder; convert into a local path (for "
            "--to savegame, then `savegame push` the run folder to the URL)",
            path=shown,
        )
    out = sg.convert(
        _source_arg(args.src), _local(args.dst), to=args.to, cfg=args.cfg, partial=args.partial,
        overwrite=args.overwrite, isolate=not args.no_isolate,
    )  # fmt: skip
    with sg.open(out) as r:
        n, total = len(r.keys()), sum(r.info(k).nbytes for k in r.keys())
    _console().print(
        f"[green]wrote[/] {lit(out)} ({args.to}, {n} tensors, {_size(total)})", soft_wrap=True
    )
    if args.cfg:  # darknet: say how much of the network the file held (cheap: no data read)
        with sg.open(args.src, cfg=args.cfg, partial=True) as src:
            cover = getattr(src, "coverage", None)
        if cover is not None:
            _console().print(text(f"{printable(args.src)}: {cover}"), soft_wrap=True)
    return 0


def _print_whole(table: Table, longest: int = 40) -> None:
    """Print ``table`` with no word of a cell cut (up to ``longest`` characters: a longer one
    folds): each column is at least as wide as its longest word — a 12-digit step stays one
    number — and where that is wider than the console (a pipe gets 80 columns) the table is
    printed at the width it needs rather than cropped at the right edge."""
    for column in table.columns:
        cells = [column.header, *column.cells]
        words = [w for cell in cells for w in getattr(cell, "plain", str(cell)).split()]
        widest = max((len(w) for w in words), default=0)
        column.min_width = max(column.min_width or 0, min(widest, longest))
    console = _console()
    need = console.measure(table, options=console.options.update(max_width=1 << 16)).minimum
    if need > console.width:
        console.print(table, width=need, crop=False)
    else:
        console.print(table)


def cmd_diff(args: argparse.Namespace) -> int:
    res = sg.diff(
        _source_arg(args.a),
        _source_arg(args.b),
        cfg_a=args.cfg_a,
        cfg_b=args.cfg_b,
        partial=args.partial,
        isolate=not args.no_isolate,
    )
    _console().print(text(f"{printable(args.a)}  vs  {printable(args.b)}"), soft_wrap=True)
    table = Table()
    for col in ("tensor", "difference"):
        table.add_column(col)
    for name in res.removed:
        table.add_row(text(name), Text("only in A", style="red"))
    for name in res.added:
        table.add_row(text(name), Text("only in B", style="green"))
    for name, (ia, ib) in sorted(res.changed.items()):
        table.add_row(
            text(name),
            text(f"{ia.dtype}{list(ia.shape)} -> {ib.dtype}{list(ib.shape)}", style="yellow"),
        )
    identical = set(res.identical)
    differing = sorted(
        (n for n in res.max_abs_diff if n not in identical),
        key=lambda n: -_order(res.max_abs_diff[n]),
    )
    for name in differing:
        m = res.max_abs_diff[name]
        table.add_row(text(name), f"max |a-b| = {m if isinstance(m, int) else format(m, '.6g')}")
    if args.all:
        for name in res.identical:
            table.add_row(text(name), Text("identical", style="dim"))
    if table.row_count:
        _console().print(table)
    _console().print(
        f"{len(res.identical)} identical, {len(differing)} differ in value, {len(res.changed)} differ "
        f"in dtype/shape, {len(res.removed)} only in A, {len(res.added)} only in B"
    )
    return 0 if res.equal else 1


def _order(x: float) -> float:
    return float("inf") if x != x else x  # NaN sorts first: it is the worst difference


# ---- prune -------------------------------------------------------------------------------------
def _keep_from_args(args: argparse.Namespace, root: Where) -> sg.Keep | None:
    """The rule given on the command line, or None to use the run's own (from run.json).

    ``--keep-best`` without ``--monitor`` / ``--mode`` takes them from the run's rule when it
    ranks by the same metric; a mode nobody gave is refused, never guessed: ranking an accuracy
    as a loss would keep the worst checkpoints and delete the best."""
    given = {
        "last": args.keep_last,
        "best": args.keep_best,
        "monitor": args.monitor,
        "mode": args.mode,
        "every": args.keep_every,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    if given.get("best") and "mode" not in given:
        runs = _runs()
        own = runs.run_keep(root, runs.read_run_file(root))
        monitor = given.get("monitor", own.monitor if own else None)
        if own is None or not own.best or own.monitor != monitor:
            raise ValueError(
                f"--keep-best ranks by {monitor or '--monitor'}: say whether smaller or larger "
                "is better with --mode min (a loss) or --mode max (an accuracy)"
            )
        given.update(monitor=own.monitor, mode=own.mode)
    return sg.Keep(**given)


def cmd_prune(args: argparse.Namespace) -> int:
    """Apply retention to the run's ``step-…`` checkpoints only: folders set aside as damaged
    and temp folders are never touched, and nothing is deleted while a checkpoint retention
    would keep in its place is damaged (issue 9.8).

    The plan, the damage check and the deletion are the Checkpointer's own
    (:mod:`savegame.checkpointer.retention`); what differs stays here: ``--dry-run``, the
    listing, and the answer to a damaged kept checkpoint — the Checkpointer sets it aside and
    plans again, ``prune`` refuses and deletes nothing (exit 1): a person is there to look."""
    runs = _runs()
    root = _where(args.run)
    if isinstance(root, Store):
        if getattr(root, "read_only", False):
            raise sg.StorageError(
                f"{printable(root)} is read-only (http(s) URLs can only be read): prune the run "
                "where it is written (a local folder, s3://, gs:// or az://)",
                path=printable(root),
            )
        refuse_checkpoint(
            root,
            _is_checkpoint(root) or _looks_like_step(_checkpoint_at(args.run, root).name),
            f"prune its run with `savegame prune {_parent(args.run, root)}`",
        )
        if not _is_run(root):  # never take a lease where there is no run
            raise _nothing_at(args.run)
    else:
        if not root.is_dir():
            raise sg.CheckpointNotFoundError(f"run folder {root} does not exist", path=root)
        refuse_checkpoint(
            root,
            runs.looks_like_checkpoint(root),
            f"prune its run with `savegame prune {root.parent}`",
        )
    run_problem = runs.run_file_problem(root)
    if run_problem:
        raise sg.FormatError(
            run_problem + "; prune deletes nothing meanwhile", path=runs.run_file(root)
        )
    keep = _keep_from_args(args, root)
    lock = runs.run_lock(root)
    if not args.dry_run:
        lock.acquire()  # never prune under a live training run
    try:
        infos = runs.list_run(root, keep)
        newest = max((i.step for i in infos if i.valid and i.ours), default=None)
        doomed = runs.unkept(infos, spare=newest)
        # Deleting a valid checkpoint is safe only if those kept in its place are intact: read
        # them (only when something would be deleted).
        damaged = runs.find_damage(infos, spare=newest, verified=set())
        for i in infos:
            action = "delete" if i in doomed and not damaged else "keep"
            if not i.valid:
                reason = "damaged: left alone (not counted by retention)"
            elif i.path in damaged:
                reason = f"DAMAGED: {damaged[i.path]}"
            else:
                reason = (
                    ", ".join(i.kept_for) if i.kept_for else ("newest" if i.step == newest else "")
                )
            colour = "red" if action == "delete" or i.path in damaged or not i.valid else "green"
            _console().print(
                f"[{colour}]{action:<6}[/] {lit(i.path.name)}  {lit(reason)}", soft_wrap=True
            )
        if damaged:
            _console().print(
                f"[red]deleted nothing:[/] {len(damaged)} checkpoint(s) that retention would keep "
                "instead are damaged; inspect them (`savegame verify`), delete or move them away, "
                "and prune again"
            )
            return 1
        if args.dry_run:
            _console().print(f"[dim]dry run: {len(doomed)} would be deleted[/]")
            return 0
        deleted = runs.delete_unkept(infos, spare=newest, keep=keep, strict=True)
        _console().print(f"deleted {len(deleted)} checkpoints")
        return 0
    finally:
        lock.release()


# ---- push, pull --------------------------------------------------------------------------------
def cmd_push(args: argparse.Namespace) -> int:
    """``savegame push RUN URL``: :func:`savegame.tools.transfer.push`."""
    from savegame.tools import transfer

    return _transfer("pushed", transfer.push, args.run, args.url, args)


def cmd_pull(args: argparse.Namespace) -> int:
    """``savegame pull URL RUN``: :func:`savegame.tools.transfer.pull`."""
    from savegame.tools import transfer

    return _transfer("pulled", transfer.pull, args.url, args.run, args)


def _transfer(verb: str, move: Any, src: str, dst: str, args: argparse.Namespace) -> int:
    try:
        report = move(
            _transfer_arg(src), _transfer_arg(dst), steps=args.step, progress=_progress(args)
        )
    except sg.IntegrityError as exc:
        return _damaged_source(exc)
    return _transfer_summary(verb, report)


def _damaged_source(exc: sg.IntegrityError) -> int:
    """A source file that does not match its manifest: that checkpoint was not moved (the
    others were, verified). Exit 1, as for a source manifest that does not parse: a check
    found a damaged checkpoint, not bad input."""
    main.say_error(exc)
    return 1


def _transfer_arg(arg: str) -> str | Path:
    return arg if _is_remote(arg) else _local(arg)


def _progress(args: argparse.Namespace) -> bool | None:
    """No bar with --no-progress; else transfer's default (a bar when stderr is a terminal)."""
    return False if args.no_progress else None


def _transfer_summary(verb: str, report: Any) -> int:
    """One summary line (and the problems, if any); exit 0 only when everything verified."""
    copied, skipped = len(report.copied), len(report.skipped)
    line = (
        f"{verb} {printable(report.source)} -> {printable(report.dest)}: {copied} checkpoint"
        f"{'' if copied == 1 else 's'} copied, {skipped} already there; "
        f"{_size(report.bytes_moved)} moved, {_size(report.bytes_skipped)} skipped"
    )
    if report.verified:
        _console().print(f"{lit(line)}; [green]all verified[/]", soft_wrap=True)
    else:
        n = len(report.problems)
        _console().print(
            f"{lit(line)}; [red]NOT verified: {n} problem{'' if n == 1 else 's'}[/]", soft_wrap=True
        )
        for p in report.problems:
            _console().print(text(f"     {p}"), soft_wrap=True)
    if report.ignored:
        steps = ", ".join(str(s) for s in report.ignored)
        _console().print(
            text(f"     not moved: step(s) {steps} never committed in the source (no manifest)"),
            soft_wrap=True,
        )
    return 0 if report.verified else 1


# ---- demo --------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from savegame import demo

    return demo.main(args.dir)
