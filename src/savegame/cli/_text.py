"""Print text that comes from files and paths literally (issue 9.12).

Key invariant: every string the CLI did not write itself (tensor names, keys, metadata, paths,
error messages that quote them) goes through :func:`lit` (inside rich markup) or :func:`text`
(as a renderable) before it reaches the terminal. Neither is ever parsed as rich markup or
emoji codes, and control characters, terminal escapes, bidi overrides, other invisible format
characters and undecodable path bytes are shown as ``\\x1b``-style escapes, so a hostile name
can neither restyle, hide, reorder nor clear what the user reads, nor crash the command
(``[/x]`` used to raise ``MarkupError``).

Second invariant (issue 11): a URL in anything printed is shown without its credentials
(:func:`savegame.storage.urls.redact`: ``s3://***@bucket/…``, ``?token=***``), whatever put it
there — an argument echoed back, a store's error message, a warning, a log line.
"""

from __future__ import annotations

from rich.markup import escape
from rich.text import Text

from savegame.errors import escaped

__all__ = ["clean", "lit", "text"]


def clean(value: object) -> str:
    """``str(value)`` with every invisible or terminal-controlling character made visible.

    Example:
        >>> clean("a\\x1b[2Jb")
        'a\\\\x1b[2Jb'
    """
    s = value if isinstance(value, str) else str(value)
    if "://" in s:  # a URL: never show its credentials
        from savegame.storage.urls import redact_text

        s = redact_text(s)
    return escaped(s)


def lit(value: object) -> str:
    """:func:`clean`, then escaped so that rich markup shows it literally (``[b]`` stays ``[b]``).

    Use it for every file- or path-derived piece of a markup string:
    ``console.print(f"[red]FAIL[/] {lit(path)}")``.
    """
    return escape(clean(value))


def text(value: object, style: str = "") -> Text:
    """:func:`clean` as a :class:`rich.text.Text`: never parsed as markup (tables, trees)."""
    return Text(clean(value), style=style)
