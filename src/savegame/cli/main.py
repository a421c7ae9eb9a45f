"""``savegame`` command line: thin argument parsing over the public API, rendered with rich.

Exit status: 0 success; 1 a check found problems (``verify``, ``demo`` mismatch); 2 bad input or
a savegame error (the message says what to do).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

import savegame as sg
from savegame import errors, policy
from savegame.checkpointer import list_run
from savegame.engine import reader
from savegame.interop import base

__all__ = ["main"]

console = Console()
err_console = Console(stderr=True)


def _size(n: int) -> str:
    v = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if v < 1024 or unit == "TB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"


def _is_run(path: Path) -> bool:
    return path.is_dir() and not reader.is_checkpoint_dir(path) and any(
        p.name.startswith("step-") for p in path.iterdir()
    )


def _options(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Reader options for a file given on the command line: the darknet cfg, and Keras/HDF5
    files read in a child process first (libhdf5 can crash or hang on hostile files), unless
    --no-isolate. Each reader ignores the options meant for other formats."""
    opts: dict[str, Any] = {"isolate": not args.no_isolate, **extra}
    if args.cfg:
        opts["cfg"] = args.cfg
    return opts


# ---- ls ----------------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    root = Path(args.run)
    if reader.is_checkpoint_dir(root):
        raise errors.CheckpointNotFoundError(
            f"{root} is one checkpoint, not a run folder; see it with `savegame show {root}`, "
            f"or list its run with `savegame ls {root.parent}`",
            path=root,
        )
    infos = list_run(root, _keep_from_args(args))
    if args.verify:
        problems = {i.step: reader.verify(i.path) for i in infos}
    table = Table(title=f"{root}  ({len(infos)} checkpoints)")
    for col in ("step", "time", "size", "metrics", "kept because", "valid"):
        table.add_column(col, justify="right" if col in ("step", "size") else "left")
    notes: list[str] = []
    for i in infos:
        when = dt.datetime.fromtimestamp(i.created).strftime("%Y-%m-%d %H:%M:%S") if i.created else "-"
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in i.metrics.items()) or "-"
        found = ([i.error] if i.error else []) + (problems[i.step] if args.verify and i.valid else [])
        notes.extend(f"step {i.step}: {p}" for p in found)
        why = ", ".join(i.kept_for) if i.kept_for else "[dim]would be pruned[/]"
        table.add_row(str(i.step), when, _size(i.size), metrics, why, "[red]NO[/]" if found else "[green]yes[/]")
    console.print(table)
    for note in notes:
        console.print(note, soft_wrap=True, markup=False)
    if not args.verify:
        console.print("[dim]valid = manifest checked; add --verify to check every tensor hash[/]")
    return 0


# ---- show --------------------------------------------------------------------------------------
def cmd_show(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if _is_run(path):
        refs = [r for r in reader.list_checkpoints(path) if r.valid]
        if not refs:
            raise errors.CheckpointNotFoundError(f"{path} holds no valid checkpoint", path=path)
        path = refs[-1].path
    with sg.open(path, **_options(args, listing=True)) as r:  # opaque objects listed, never built
        meta = r.metadata()
        title = f"[bold]{path}[/] ({r.format})"
        if "step" in meta:
            title += f"  step {meta['step']}"
        if meta.get("metrics"):
            title += "  " + ", ".join(f"{k}={v:.4g}" for k, v in meta["metrics"].items())
        root = Tree(title)
        infos = {k: r.info(k) for k in r.keys()}
        _render(root, r.tree(), infos, depth=0, max_items=args.max_items)
        console.print(root)
        total = sum(i.nbytes for i in infos.values())
        console.print(f"{len(infos)} tensors, {_size(total)}")
    return 0


def _leaf_text(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _render(node: Tree, obj: Any, infos: dict[str, base.TensorInfo], depth: int, max_items: int) -> None:
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    else:
        node.add(_describe(obj, infos))
        return
    for i, (k, v) in enumerate(items):
        if i >= max_items:
            node.add(f"[dim]... {len(items) - max_items} more[/]")
            break
        if isinstance(v, (list, tuple)) and len(v) > 8 and all(isinstance(x, (int, float)) for x in v):
            node.add(f"{k}: {type(v).__name__} of {len(v)} numbers")
        elif isinstance(v, (dict, list, tuple)) and v and not _is_flat(v):
            child = node.add(f"[bold]{k}[/]")
            _render(child, v, infos, depth + 1, max_items)
        else:
            node.add(f"{k}: {_describe(v, infos)}")


def _is_flat(v: Any) -> bool:
    seq = v.values() if isinstance(v, dict) else v
    return len(v) <= 8 and all(isinstance(x, (int, float, str, bool, type(None))) for x in seq)


def _describe(v: Any, infos: dict[str, base.TensorInfo]) -> str:
    if isinstance(v, base.TensorRef):
        i = infos.get(v.name)
        if i is None:
            return f"[cyan]tensor {v.name}[/]"
        return f"[cyan]{i.dtype}{list(i.shape)}[/] {_size(i.nbytes)}"
    if isinstance(v, base.Opaque):
        return f"[magenta]<opaque {v.module}.{v.qualname}>[/]"
    return _leaf_text(v)


# ---- verify ------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.path)
    targets: list[Path]
    if _is_run(path):
        targets = [r.path for r in reader.list_checkpoints(path)]
    else:
        targets = [path]
    bad = 0
    for t in targets:
        if reader.is_checkpoint_dir(t) or t.name.startswith("step-"):
            problems = reader.verify(t)
        else:
            with sg.open(t, **_options(args)) as r:
                problems = r.verify()
        if problems:
            bad += 1
            console.print(f"[red]FAIL[/] {t}", soft_wrap=True)
            for p in problems:
                console.print(f"     {p}", soft_wrap=True, markup=False)
        else:
            console.print(f"[green]ok[/]   {t}")
    if bad:
        console.print(f"[red]{bad} of {len(targets)} checkpoints have problems[/]")
        return 1
    console.print(f"[green]all {len(targets)} verified[/]")
    return 0


# ---- convert, diff -----------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    out = sg.convert(args.src, args.dst, to=args.to, cfg=args.cfg, overwrite=args.overwrite, isolate=not args.no_isolate)
    with sg.open(out) as r:
        n, total = len(r.keys()), sum(r.info(k).nbytes for k in r.keys())
    console.print(f"[green]wrote[/] {out} ({args.to}, {n} tensors, {_size(total)})", soft_wrap=True)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    res = sg.diff(args.a, args.b, cfg_a=args.cfg_a, cfg_b=args.cfg_b, isolate=not args.no_isolate)
    table = Table(title=f"{args.a}  vs  {args.b}")
    for col in ("tensor", "difference"):
        table.add_column(col)
    for name in res.removed:
        table.add_row(name, "[red]only in A[/]")
    for name in res.added:
        table.add_row(name, "[green]only in B[/]")
    for name, (ia, ib) in sorted(res.changed.items()):
        table.add_row(name, f"[yellow]{ia.dtype}{list(ia.shape)} -> {ib.dtype}{list(ib.shape)}[/]")
    differing = sorted((n for n, m in res.max_abs_diff.items() if n not in set(res.identical)), key=lambda n: -_order(res.max_abs_diff[n]))
    for name in differing:
        table.add_row(name, f"max |a-b| = {res.max_abs_diff[name]:.6g}")
    if args.all:
        for name in res.identical:
            table.add_row(name, "[dim]identical[/]")
    if table.row_count:
        console.print(table)
    console.print(
        f"{len(res.identical)} identical, {len(differing)} differ in value, {len(res.changed)} differ "
        f"in dtype/shape, {len(res.removed)} only in A, {len(res.added)} only in B"
    )
    return 0 if res.equal else 1


def _order(x: float) -> float:
    return float("inf") if x != x else x  # NaN sorts first: it is the worst difference


# ---- prune -------------------------------------------------------------------------------------
def _keep_from_args(args: argparse.Namespace) -> policy.Keep | None:
    """The rule given on the command line, or None to use the run's own (from run.json)."""
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
    return policy.Keep(**given)


def cmd_prune(args: argparse.Namespace) -> int:
    from savegame.storage import local

    root = Path(args.run)
    keep = _keep_from_args(args)
    if not root.is_dir():
        raise errors.CheckpointNotFoundError(f"run folder {root} does not exist", path=root)
    lock = local.RunLock(root)
    if not args.dry_run:
        lock.acquire()  # never prune under a live training run
    try:
        infos = list_run(root, keep)
        newest = max((i.step for i in infos if i.valid and i.ours), default=None)
        doomed = [i for i in infos if i.valid and i.ours and not i.kept_for and i.step != newest]
        for i in infos:
            action = "delete" if i in doomed else "keep"
            reason = ", ".join(i.kept_for) if i.kept_for else ("invalid: left alone" if not i.valid else "")
            console.print(f"{'[red]' if action == 'delete' else '[green]'}{action:<6}[/] {i.path.name}  {reason}")
        if args.dry_run:
            console.print(f"[dim]dry run: {len(doomed)} would be deleted[/]")
            return 0
        import uuid

        for i in doomed:
            local.remove_tree(i.path, f".tmp-deleted-{i.path.name}-{uuid.uuid4().hex[:8]}")
        console.print(f"deleted {len(doomed)} checkpoints")
        return 0
    finally:
        lock.release()


# ---- demo --------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from savegame import demo

    return demo.main(args.dir)


# ---- wiring ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="savegame", description="Exact, crash-safe checkpoints: inspect, verify, prune, convert, diff, demo.")
    p.add_argument("--version", action="version", version=f"savegame {sg.__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what savegame does")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("ls", help="list the checkpoints of a run folder")
    ls.add_argument("run")
    ls.add_argument("--verify", action="store_true", help="check every tensor hash (reads everything)")
    _retention_args(ls)
    ls.set_defaults(func=cmd_ls)

    show = sub.add_parser("show", help="show the state tree of a checkpoint (any format)")
    show.add_argument("path")
    show.add_argument("--cfg", help="darknet .cfg for a .weights file")
    show.add_argument("--max-items", type=int, default=40, help="entries shown per container")
    _isolate_arg(show)
    show.set_defaults(func=cmd_show)

    verify = sub.add_parser("verify", help="check every hash of a run, a checkpoint or a foreign file")
    verify.add_argument("path")
    verify.add_argument("--cfg", help="darknet .cfg for a .weights file")
    _isolate_arg(verify)
    verify.set_defaults(func=cmd_verify)

    convert = sub.add_parser(
        "convert",
        help="convert any checkpoint to savegame, safetensors or a weights-only torch file",
        description="Names, dtypes and values are kept bit for bit; DST appears atomically. A run "
        "folder means its newest valid checkpoint; a multi-rank checkpoint is consolidated into one.",
    )
    convert.add_argument("src", help="any readable checkpoint, or a run folder")
    convert.add_argument("dst", help="output file (safetensors, torch) or folder (savegame)")
    convert.add_argument("--to", required=True, choices=("savegame", "safetensors", "torch"))
    convert.add_argument("--cfg", help="darknet .cfg when SRC is a .weights file")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    _isolate_arg(convert)
    convert.set_defaults(func=cmd_convert)

    diff = sub.add_parser(
        "diff",
        help="compare the tensors of two checkpoints (any formats); exit 1 if they differ",
    )
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--cfg-a", help="darknet .cfg for A")
    diff.add_argument("--cfg-b", help="darknet .cfg for B")
    diff.add_argument("--all", action="store_true", help="list identical tensors too")
    _isolate_arg(diff)
    diff.set_defaults(func=cmd_diff)

    prune = sub.add_parser("prune", help="apply a retention rule to a run folder")
    prune.add_argument("run")
    prune.add_argument("--dry-run", action="store_true")
    _retention_args(prune)
    prune.set_defaults(func=cmd_prune)

    demo = sub.add_parser("demo", help="train, SIGKILL, resume, and prove the result is identical")
    demo.add_argument("--dir", help="where to put the demo's run folders (default: a temp folder)")
    demo.set_defaults(func=cmd_demo)
    return p


def _isolate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-isolate",
        action="store_true",
        help="read Keras/HDF5 files in this process (faster; only for files you trust: libhdf5 "
        "can crash on hostile files, so by default they are read in a child process first)",
    )


def _retention_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retention (default: the rule the run was trained with, from run.json)")
    g.add_argument("--keep-last", type=int, help="keep the newest K")
    g.add_argument("--keep-best", type=int, help="keep the best K by --monitor")
    g.add_argument("--monitor", help="metric name for --keep-best")
    g.add_argument("--mode", choices=("min", "max"), help="is a smaller (min) or larger (max) metric better")
    g.add_argument("--keep-every", type=int, help="keep every Nth saved checkpoint forever")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(args.func(args))
    except errors.CheckpointError as exc:
        err_console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        return 2
    except ValueError as exc:  # bad option values (e.g. Keep(best=1) without --monitor)
        err_console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
