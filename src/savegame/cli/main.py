"""``savegame`` command line: thin argument parsing over the public API, rendered with rich.

Exit status (the same for every command):

- 0: success — the listing, tree, conversion or prune was done; ``verify`` and ``ls --verify``
  found nothing wrong; ``diff`` found the checkpoints equal; ``push`` / ``pull`` moved and
  verified everything.
- 1: a check found problems — ``verify`` or ``ls --verify`` found a damaged checkpoint or
  ``run.json``, ``diff`` found differences, ``prune`` refused because a checkpoint it would
  keep is damaged, ``push`` / ``pull`` could not move a damaged source checkpoint, ``demo`` saw
  a mismatch.
- 2: bad input or a savegame error (nothing at the path or URL, an unreadable or unsupported
  file, a locked run, a bad option, an unknown URL scheme, missing credentials, access denied,
  a store that failed after retries); the message on stderr says what to do.

Every command that takes a path takes a URL too (``s3://``, ``gs://``, ``az://``, ``http(s)://``
read-only, ``file://``, ``memory://``; docs/remote.md).

Everything printed that comes from a file or a path (names, keys, metadata, paths, URLs, error
messages quoting them, warnings) goes through :mod:`savegame.cli._text`: shown literally, never
as rich markup, with control characters made visible (issue 9.12), and every URL in it without
credentials (``user:password@`` and query values shown as ``***``, issue 11).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import savegame as sg

if TYPE_CHECKING:
    import logging

    from rich.console import Console

    console: Console
    err_console: Console

__all__ = ["main"]

# This module parses the command line only: the commands (savegame.cli.commands: rich, the
# readers, numpy) are imported once a command runs, so `savegame --version` and `--help` stay
# at interpreter start-up plus argparse (issue 9.18). No command imports torch unless it needs
# tensors (convert, diff, demo, and the commands that read savegame's own run folders).


# ---- wiring ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="savegame",
        description="Exact, crash-safe checkpoints: inspect, verify, prune, convert, diff, push, "
        "pull, plot, demo. Every RUN or PATH may be a URL (s3://, gs://, az://, http(s):// "
        "read-only, file://).",
    )
    p.add_argument("--version", action="version", version=f"savegame {sg.__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what savegame does")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("ls", help="list the checkpoints of a run folder")
    ls.add_argument("run")
    ls.add_argument(
        "--verify", action="store_true", help="check every tensor hash (reads everything)"
    )
    ls.add_argument(
        "--mtbf",
        type=_positive_seconds,
        help="expected seconds between failures, for the interval advice (default: the one the "
        "run was given, else learned from its recorded failures)",
    )
    _retention_args(ls)
    ls.set_defaults(func="cmd_ls")

    show = sub.add_parser("show", help="show the state tree of a checkpoint (any format)")
    show.add_argument("path")
    show.add_argument("--cfg", help="darknet .cfg for a .weights file")
    show.add_argument(
        "--max-items", type=_positive_int, default=40, help="entries shown per container"
    )
    _isolate_arg(show)
    show.set_defaults(func="cmd_show")

    verify = sub.add_parser(
        "verify", help="check every hash of a run, a checkpoint or a foreign file"
    )
    verify.add_argument("path")
    verify.add_argument("--cfg", help="darknet .cfg for a .weights file")
    _partial_arg(verify)
    _isolate_arg(verify)
    verify.set_defaults(func="cmd_verify")

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
    _partial_arg(convert)
    convert.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    _isolate_arg(convert)
    convert.set_defaults(func="cmd_convert")

    diff = sub.add_parser(
        "diff",
        help="compare the tensors of two checkpoints (any formats); exit 1 if they differ",
    )
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--cfg-a", help="darknet .cfg for A")
    diff.add_argument("--cfg-b", help="darknet .cfg for B")
    _partial_arg(diff)
    diff.add_argument("--all", action="store_true", help="list identical tensors too")
    _isolate_arg(diff)
    diff.set_defaults(func="cmd_diff")

    prune = sub.add_parser("prune", help="apply a retention rule to a run folder")
    prune.add_argument("run")
    prune.add_argument("--dry-run", action="store_true")
    _retention_args(prune)
    prune.set_defaults(func="cmd_prune")

    plot = sub.add_parser(
        "plot", help="the monitored metrics over a run's checkpoints, restarts marked"
    )
    plot.add_argument("run")
    plot.add_argument("--metric", action="append", help="plot only this metric (repeat for more)")
    plot.add_argument("--out", help="also write the plot to this PNG file (needs matplotlib)")
    plot.set_defaults(func="cmd_plot")

    push = sub.add_parser(
        "push",
        help="copy a run (or one checkpoint) to a URL; resumable, exit 0 only when all verified",
        description="Copy every committed checkpoint of RUN (or the one checkpoint RUN names) to "
        "the run folder URL. Re-running an interrupted push continues where it stopped: "
        "checkpoints and files already there and verified are skipped.",
    )
    push.add_argument("run", help="a run folder or one checkpoint (a path or a URL)")
    push.add_argument("url", help="the destination run folder (s3://…, gs://…, az://…, a path)")
    _transfer_args(push)
    push.set_defaults(func="cmd_push")

    pull = sub.add_parser(
        "pull",
        help="copy a run (or one checkpoint) from a URL; resumable, exit 0 only when all verified",
        description="Copy every committed checkpoint of the run at URL (or the one checkpoint "
        "URL names) into the run folder RUN. Re-running an interrupted pull continues where it "
        "stopped (ranged downloads resume a cut file).",
    )
    pull.add_argument("url", help="the source run folder or checkpoint (a URL or a path)")
    pull.add_argument("run", help="the destination run folder")
    _transfer_args(pull)
    pull.set_defaults(func="cmd_pull")

    demo = sub.add_parser("demo", help="train, SIGKILL, resume, and prove the result is identical")
    demo.add_argument("--dir", help="where to put the demo's run folders (default: a temp folder)")
    demo.set_defaults(func="cmd_demo")
    return p


def _transfer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--step",
        type=int,
        action="append",
        help="move only this step (repeat for more; default: every committed checkpoint)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: one on a terminal)"
    )


def _partial_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--partial",
        action="store_true",
        help="accept a darknet .weights file holding fewer layers than its cfg (a backbone such "
        "as darknet53.conv.74); without it such a file is an error",
    )


def _isolate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-isolate",
        action="store_true",
        help="read Keras/HDF5 files in this process (faster; only for files you trust: libhdf5 "
        "can crash on hostile files, so by default they are read in a child process first)",
    )


def _retention_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "retention (default: the rule the run was trained with, from run.json)"
    )
    g.add_argument("--keep-last", type=int, help="keep the newest K")
    g.add_argument("--keep-best", type=_positive_int, help="keep the best K by --monitor")
    g.add_argument("--monitor", help="metric name for --keep-best")
    g.add_argument(
        "--mode", choices=("min", "max"), help="is a smaller (min) or larger (max) metric better"
    )
    g.add_argument(
        "--keep-every", type=_positive_int, help="keep every Nth saved checkpoint forever"
    )


def _positive_int(text: str) -> int:
    """A count of 1 or more: 0 would not mean "none" to every option (``--keep-best 0`` kept
    only the newest checkpoint), so it is refused as the command line is read."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 or more")
    return value


def _positive_seconds(text: str) -> float:
    """An option's seconds, checked when the command line is read (before any output)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number of seconds")
    return value


@contextmanager
def _quiet_stdio() -> Iterator[None]:
    """Output the terminal cannot encode (an ASCII-only ``PYTHONIOENCODING``, a C locale on an
    old Python) is escaped (``\\u2026``) instead of ending the command with an encoding
    error: a path or a tensor name is never a reason to refuse to show the rest. The streams'
    own setting comes back afterwards (``main()`` called from a host program)."""
    undo = []
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                before = stream.errors
                reconfigure(errors="backslashreplace")
                undo.append((reconfigure, before))
            except (AttributeError, ValueError, OSError):  # closed or detached by an embedder
                pass
    try:
        yield
    finally:
        for reconfigure, before in undo:
            with contextlib.suppress(ValueError, OSError):  # closed meanwhile: nothing to give back
                reconfigure(errors=before)


def _closed_pipe() -> NoReturn:
    """stdout's reader went away (``savegame verify RUN | head -1``): stop quietly with the
    status of a process ended by SIGPIPE (141), never 1 ("a check found problems") or 2."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
    except (OSError, ValueError):
        pass
    raise SystemExit(128 + 13)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:  # log lines quote paths too: printed literally, like everything else
        import logging

        handler = logging.StreamHandler()
        handler.setFormatter(_clean_formatter("%(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    from savegame.cli import commands  # rich and the readers: only once a command runs

    with _quiet_stdio(), warnings.catch_warnings():
        # savegame's own warnings (a checkpoint skipped, strings left out of a conversion) are
        # part of the command's output: always shown, through the same literal printing.
        warnings.simplefilter("always", sg.CorruptCheckpointWarning)
        warnings.simplefilter("always", sg.LossyConversionWarning)
        warnings.showwarning = _show_warning
        try:
            return int(getattr(commands, args.func)(args))
        except sg.CheckpointError as exc:
            say_error(exc)
            return 2
        except ValueError as exc:  # bad option values (e.g. Keep(best=1) without --monitor)
            say_error(exc)
            return 2
        except BrokenPipeError:  # an OSError: before the clause below
            _closed_pipe()
        except OSError as exc:  # a path the OS refuses (permissions, a file where a folder is)
            say_error(exc)
            return 2
        except KeyboardInterrupt:
            return 130
        except Exception as exc:  # an object-store failure savegame did not translate
            if not type(exc).__module__.startswith("obstore"):
                raise
            message = str(exc).split("\n\nDebug source:", 1)[0]  # lit() redacts its URLs
            say_error(message)
            return 2


def __getattr__(name: str) -> Any:
    """``console`` and ``err_console`` (rich) are made on first use (PEP 562), so that
    ``--version`` and ``--help`` do not import rich. Replace them (e.g. with a wider Console)
    by assigning the module attribute."""
    if name in ("console", "err_console"):
        from rich.console import Console

        # emoji=False: ":cat:" in a tensor name stays ":cat:" (markup is escaped by _text).
        value = Console(stderr=name == "err_console", emoji=False)
        if value.width < 1:  # COLUMNS=0 (unset, to Python's shutil): rich took it as 0 columns
            import shutil

            width = shutil.get_terminal_size().columns
            value = Console(
                stderr=name == "err_console", emoji=False, width=width if width > 0 else 80
            )
        if name == "console":
            value.on_broken_pipe = _closed_pipe  # type: ignore[method-assign]  # rich exits 1
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _err_console() -> Console:
    return sys.modules[__name__].err_console  # type: ignore[no-any-return]


#: The most characters of an error message printed (a message quoting a string from a file is
#: bounded where it is made; this is the backstop for one that is not).
_ERROR_MAX = 4000


def say_error(exc: object) -> None:
    """``error: <message>`` on stderr: literal, bounded, and not run through rich's highlighter
    (quadratic on one long unbroken word: 100 KB of a file's string took minutes)."""
    from savegame.cli._text import lit

    message = str(exc)
    if len(message) > _ERROR_MAX:
        message = message[:_ERROR_MAX] + f"… ({len(message) - _ERROR_MAX} more characters)"
    _err_console().print(f"[red]error:[/] {lit(message)}", soft_wrap=True, highlight=False)


def _clean_formatter(fmt: str) -> logging.Formatter:
    """A log formatter printing records literally (imported with logging, only for -v)."""
    import logging

    from savegame.cli._text import clean

    class _CleanFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return clean(super().format(record))

    return _CleanFormatter(fmt)


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
    line: str | None = None,
) -> None:  # fmt: skip
    """Print a warning raised during a command as one literal line on stderr."""
    from savegame.cli._text import lit

    _err_console().print(f"[yellow]warning:[/] {lit(message)}", soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
