"""The darknet cfg: parsing it into sections, and typed, bounded access to their options.

Key invariant: a cfg is read as data with every size bounded: at most :data:`MAX_CFG_BYTES` of
text, :data:`MAX_SECTIONS` sections and :data:`MAX_OPTIONS_PER_SECTION` options each, and
every number a layer uses passes through :class:`Opts`, which checks it against a range before
anything is computed from it. Malformed input is a :class:`~savegame.errors.FormatError` naming
the cfg, the layer and the line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from savegame import errors

__all__ = [
    "MAX_CFG_BYTES",
    "MAX_OPTIONS_PER_SECTION",
    "MAX_SECTIONS",
    "CfgSection",
    "Opts",
    "parse_cfg",
]

# Caps (FORMATS.md §5 traps, §7). Real cfgs are a few KB with < 200 sections.
MAX_CFG_BYTES = 4 << 20
MAX_SECTIONS = 10_000
MAX_OPTIONS_PER_SECTION = 256

_ALIASES = {
    "conv": "convolutional",
    "network": "net",
    "conn": "connected",
    "max": "maxpool",
    "avg": "avgpool",
    "soft": "softmax",
    "lrn": "normalization",
}


@dataclass(frozen=True, slots=True)
class CfgSection:
    """One ``[type]`` block of a cfg: its options (first occurrence wins, as in darknet)."""

    type: str
    options: Mapping[str, str]
    line: int


def parse_cfg(text: str, *, path: str | None = None) -> list[CfgSection]:
    """Parse a darknet cfg (INI-like, sections repeat) into sections, in order.

    Follows darknet's ``read_cfg``: all whitespace inside a line is removed, ``#`` and ``;``
    start comment lines, every other line is ``[section]`` or ``key=value``. Unlike darknet, a
    ``#`` after a value also starts a comment, and anything else is an error.

    Args:
        text: The cfg's content.
        path: Reported on errors.

    Returns:
        The sections, the first being ``[net]``.

    Raises:
        FormatError: Malformed lines, an option before any section, too many sections or
            options, or a first section other than ``[net]``.
    """
    if len(text) > MAX_CFG_BYTES:
        raise errors.FormatError(
            f"cfg {path} is {len(text)} characters, over the {MAX_CFG_BYTES} cap", path=path
        )
    sections: list[CfgSection] = []
    current: dict[str, str] | None = None
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = "".join(raw_line.split())
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise errors.FormatError(
                    f"cfg {path} line {lineno}: malformed section header {raw_line.strip()!r}",
                    path=path,
                )
            if len(sections) >= MAX_SECTIONS:
                raise errors.FormatError(
                    f"cfg {path} has more than {MAX_SECTIONS} sections", path=path
                )
            kind = line[1:-1].lower()
            kind = _ALIASES.get(kind, kind)
            current = {}
            sections.append(CfgSection(type=kind, options=current, line=lineno))
            continue
        key, sep, value = line.partition("=")
        value = value.split("#", 1)[0]
        if not sep or not key:
            raise errors.FormatError(
                f"cfg {path} line {lineno}: expected key=value, got {raw_line.strip()!r}",
                path=path,
            )
        if current is None:
            raise errors.FormatError(
                f"cfg {path} line {lineno}: option {key!r} before any [section]", path=path
            )
        if len(current) >= MAX_OPTIONS_PER_SECTION:
            raise errors.FormatError(
                f"cfg {path} line {lineno}: more than {MAX_OPTIONS_PER_SECTION} options",
                path=path,
            )
        current.setdefault(key.lower(), value)
    if not sections or sections[0].type != "net":
        raise errors.FormatError(
            f"cfg {path} must start with a [net] section (is it a darknet cfg?)", path=path
        )
    return sections


class Opts:
    """Typed, bounded access to one section's options."""

    def __init__(self, section: CfgSection, index: int, path: str | None) -> None:
        self._s = section
        self._i = index
        self.path = path

    def error(self, msg: str) -> errors.FormatError:
        where = "[net]" if self._i < 0 else f"layer {self._i} [{self._s.type}]"
        return errors.FormatError(
            f"cfg {self.path} {where} (line {self._s.line}): {msg}", path=self.path
        )

    def has(self, key: str) -> bool:
        return key in self._s.options

    def get_int(self, key: str, default: int, lo: int, hi: int) -> int:
        raw = self._s.options.get(key)
        if raw is None:
            value = default
        else:
            try:
                value = int(raw, 10)
            except ValueError:
                # darknet uses atoi/atof; accept "1.0"-style integers, nothing else.
                try:
                    f = float(raw)
                except ValueError:
                    raise self.error(f"{key}={raw!r} is not a number") from None
                if not math.isfinite(f) or f != int(f):
                    raise self.error(f"{key}={raw!r} is not an integer") from None
                value = int(f)
        if not lo <= value <= hi:
            raise self.error(f"{key}={value} is outside [{lo}, {hi}]")
        return value

    def get_float(self, key: str, default: float) -> float:
        raw = self._s.options.get(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self.error(f"{key}={raw!r} is not a number") from None
        if not math.isfinite(value):
            raise self.error(f"{key}={raw!r} is not finite")
        return value

    def get_str(self, key: str, default: str) -> str:
        return self._s.options.get(key, default).lower()

    def get_ints(self, key: str, lo: int, hi: int, *, required: bool) -> list[int]:
        raw = self._s.options.get(key)
        if raw is None or raw == "":
            if required:
                raise self.error(f"missing {key}=")
            return []
        parts = [p for p in raw.split(",") if p != ""]
        if len(parts) > 1024:
            raise self.error(f"{key}= lists more than 1024 values")
        out: list[int] = []
        for p in parts:
            try:
                v = int(p, 10)
            except ValueError:
                raise self.error(f"{key}={raw!r} is not a list of integers") from None
            if not lo <= v <= hi:
                raise self.error(f"{key} value {v} is outside [{lo}, {hi}]")
            out.append(v)
        return out
