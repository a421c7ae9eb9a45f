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

import unicodedata

from rich.markup import escape
from rich.text import Text

__all__ = ["clean", "lit", "text"]

# Unicode categories shown escaped: Cc (C0, DEL, C1 controls), Cf (format: bidi overrides and
# isolates, zero-width characters), Cs (surrogates: undecodable bytes of a file name, which
# could not even be encoded for the terminal), Co (private use), Zl/Zp (line/paragraph
# separators, which break a line like "\n").
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


def _visible(ch: str) -> str:
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's surrogateescape: the original byte
        return f"\\x{o - 0xDC00:02x}"
    if o <= 0xFF:
        return f"\\x{o:02x}"
    if o <= 0xFFFF:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


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
    if s.isprintable():  # the common case: nothing to do (space is printable, "\\t" is not)
        return s
    return "".join(_visible(c) if c != " " and unicodedata.category(c) in _HIDDEN else c for c in s)


def lit(value: object) -> str:
    """:func:`clean`, then escaped so that rich markup shows it literally (``[b]`` stays ``[b]``).

    Use it for every file- or path-derived piece of a markup string:
    ``console.print(f"[red]FAIL[/] {lit(path)}")``.
    """
    return escape(clean(value))


def text(value: object, style: str = "") -> Text:
    """:func:`clean` as a :class:`rich.text.Text`: never parsed as markup (tables, trees)."""
    return Text(clean(value), style=style)
