"""``savegame plot RUN``: the monitored metrics over a run's checkpoints, restarts marked — in
the terminal (a sparkline per metric and a table), and as a PNG with ``--out`` (matplotlib).

The points are the metrics each checkpoint's manifest records (``ckpt.step(..., metrics=)``), so
only checkpoints still in the run folder are plotted: retention decides what history there is.
Restarts come from ``run.json``'s sessions (one per Checkpointer that opened the run for
writing; a run folder written before sessions were recorded shows none): each later session is
a restart, "after a crash" when the session before it ended without ``close()``; it is drawn
after the newest checkpoint created before it started (the one it resumed from, unless that
one was since deleted).

Invariant: like every command, this reads the public run-folder functions only
(:mod:`savegame.checkpointer`), imports no torch, and prints every file-derived string through
:mod:`savegame.cli._text`. matplotlib is imported only for ``--out``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

import savegame as sg
from savegame.cli import main
from savegame.cli._text import text

if TYPE_CHECKING:
    from savegame.checkpointer import CheckpointInfo

__all__ = ["Restart", "cmd_plot", "restarts", "sparkline"]

_BARS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True, slots=True)
class Restart:
    """A restart of the run: when, after which listed checkpoint, and whether the session
    before it failed (ended without ``close()``)."""

    at: float
    after_step: int | None
    crashed: bool


def sparkline(values: list[float]) -> str:
    """One bar per value, scaled from the smallest to the largest; NaN is a blank.

    Example:
        >>> sparkline([0.0, 0.5, 1.0, float("nan"), 1.0])
        '▁▅█ █'
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return " " * len(values)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(" ")
        elif span == 0:
            out.append(_BARS[len(_BARS) // 2])
        else:
            out.append(_BARS[round((v - lo) / span * (len(_BARS) - 1))])
    return "".join(out)


def restarts(record: dict[str, Any] | None, ckpts: list[CheckpointInfo]) -> list[Restart]:
    """The run's restarts from ``run.json`` (``record``), placed after the checkpoints listed."""
    sessions = record.get("sessions") if record else None
    if not isinstance(sessions, list):
        return []
    out = []
    for prev, cur in zip(sessions, sessions[1:], strict=False):
        start = cur.get("start") if isinstance(cur, dict) else None
        if not isinstance(start, int | float) or isinstance(start, bool):
            continue
        before = [c.step for c in ckpts if c.created is not None and c.created <= start]
        crashed = isinstance(prev, dict) and prev.get("failed") is True
        out.append(Restart(float(start), max(before) if before else None, crashed))
    return out


def mark_index(r: Restart, ckpts: list[CheckpointInfo]) -> int | None:
    """Where both views mark a restart: the first listed checkpoint written after it (also when
    the checkpoint it resumed from was pruned since), or None if none was."""
    return next(
        (n for n, c in enumerate(ckpts) if r.after_step is None or c.step > r.after_step), None
    )


def cmd_plot(args: argparse.Namespace) -> int:
    from savegame import checkpointer as runs  # the public run-folder functions; no torch
    from savegame.cli import commands  # where a RUN argument points: a path or a URL

    root = commands.run_at(args.run, "plot its run with `savegame plot {parent}`")
    shown = commands.printable(root)
    if isinstance(root, Path) and not root.is_dir():
        raise sg.CheckpointNotFoundError(f"no run folder at {root}", path=root)
    ckpts = sorted(
        (i for i in runs.list_run(root) if i.kind == "checkpoint" and i.valid),
        key=lambda i: i.step,
    )
    names = sorted({k for i in ckpts for k in i.metrics})
    if args.metric:
        unknown = [m for m in args.metric if m not in names]
        if unknown:
            raise ValueError(
                f"no metric {', '.join(map(repr, unknown))} in {shown}; recorded: "
                + (", ".join(names) or "none")
            )
        names = list(dict.fromkeys(args.metric))
    marks = restarts(runs.read_run_file(root), ckpts)
    if not names:
        if args.out:
            raise ValueError(
                f"nothing to plot: no checkpoint in {shown} records metrics "
                "(pass them with ckpt.step(..., metrics={...}))"
            )
        main.console.print(
            text(f"{shown}: no checkpoint records metrics (pass ckpt.step(..., metrics={{...}}))")
        )
        return 0
    _print(shown, ckpts, names, marks)
    if args.out:
        out = _png(Path(args.out), shown, ckpts, names, marks)
        main.console.print(text(f"wrote {out}"))
    return 0


def _series(ckpts: list[CheckpointInfo], name: str) -> list[float]:
    return [float(i.metrics.get(name, math.nan)) for i in ckpts]


def _print(root: str, ckpts: list[CheckpointInfo], names: list[str], marks: list[Restart]) -> None:
    console = main.console
    crashes = sum(r.crashed for r in marks)
    head = f"{root}  ({len(ckpts)} checkpoints, steps {ckpts[0].step}..{ckpts[-1].step}"
    if marks:
        head += f", {len(marks)} restart{'s' if len(marks) != 1 else ''}"
        head += f", {crashes} after a crash" if crashes else ""
    console.print(text(head + ")"))
    # Under each sparkline, "|" sits under the first checkpoint after a restart ("x": a crash).
    ruler = [" "] * len(ckpts)
    for r in marks:
        idx = mark_index(r, ckpts)
        if idx is not None:
            ruler[idx] = "x" if r.crashed or ruler[idx] == "x" else "|"
    width = max(len(n) for n in names)
    for name in names:
        vals = _series(ckpts, name)
        finite = [v for v in vals if math.isfinite(v)]
        line = Text(f"{'':2}")
        line.append_text(text(name.ljust(width)))
        line.append(f"  {sparkline(vals)}  ")
        if finite:
            first, last = finite[0], finite[-1]
            line.append(f"{first:.4g} → {last:.4g} (min {min(finite):.4g}, max {max(finite):.4g})")
        console.print(line, soft_wrap=True)
        if marks:
            console.print(" " * (width + 4) + "".join(ruler), soft_wrap=True)
    table = Table()
    table.add_column("step", justify="right")
    for name in names:
        table.add_column(text(name), justify="right")
    for r in marks:  # before every checkpoint still listed
        if r.after_step is None:
            table.add_row(*_restart_row(r, len(names)))
    for i in ckpts:
        table.add_row(str(i.step), *(_cell(i.metrics.get(n)) for n in names))
        for r in marks:
            if r.after_step == i.step:
                table.add_row(*_restart_row(r, len(names)))
    console.print(table)
    if marks:
        console.print(
            "[dim]| = restart, x = restart after a crash (under the first checkpoint written "
            "after it; in the table, the row just before that checkpoint)[/]"
        )


def _restart_row(r: Restart, n: int) -> list[Text]:
    label = Text(
        "↻ restart" + (" (crash)" if r.crashed else ""), style="red" if r.crashed else "yellow"
    )
    return [label, *(Text("") for _ in range(n))]


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _png(
    out: Path, root: str, ckpts: list[CheckpointInfo], names: list[str], marks: list[Restart]
) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed: we only write a file
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise sg.MissingDependencyError(
            "savegame plot --out needs matplotlib to write a PNG: pip install matplotlib "
            "(without --out the plot is printed in the terminal)"
        ) from exc
    steps = [i.step for i in ckpts]
    fig, axes = plt.subplots(
        len(names), 1, sharex=True, figsize=(8, 2.4 * len(names) + 0.6), squeeze=False
    )
    try:
        for ax, name in zip(axes[:, 0], names, strict=True):
            ax.plot(steps, _series(ckpts, name), marker="o", markersize=3)
            ax.set_ylabel(name)
            ax.grid(True, alpha=0.3)
            for r in marks:
                idx = mark_index(r, ckpts)  # as in the terminal: just before that checkpoint
                if idx is None:
                    continue
                x = steps[idx] if idx == 0 else (steps[idx - 1] + steps[idx]) / 2
                ax.axvline(
                    x,
                    color="tab:red" if r.crashed else "tab:gray",
                    linestyle="--",
                    linewidth=1,
                    label="restart after a crash" if r.crashed else "restart",
                )
        axes[-1, 0].set_xlabel("step")
        axes[0, 0].set_title(str(root))
        if marks:
            handles, labels = axes[0, 0].get_legend_handles_labels()
            uniq = dict(zip(labels, handles, strict=True))
            axes[0, 0].legend(uniq.values(), uniq.keys(), fontsize="small")
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out
