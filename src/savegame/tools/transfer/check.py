"""Verification on the fly: one file's bytes hashed as they stream by and checked against its
manifest entry, with the same checks as :func:`savegame.engine.reader.verify`.

Invariant: :meth:`FileCheck.finish` passes only when the size, every tensor's hash and the
header's hash match; otherwise an :class:`~savegame.errors.IntegrityError` names the file (and
tensor), and the caller commits nothing of that step.
"""

from __future__ import annotations

from savegame import errors
from savegame.format import hashing, manifest


class FileCheck:
    """Hashes one file's bytes as they stream by (in order) and checks them against its
    manifest entry: the same checks as :func:`savegame.engine.reader.verify`."""

    def __init__(self, m: manifest.Manifest, name: str, where: str) -> None:
        self.m, self.name, self.where = m, name, where
        self.entry = m.files[name]
        spans = sorted(
            (c.offset, c.length, c.hash, key)
            for key, t in m.tensors.items()
            for c in t.chunks
            if c.file == name
        )
        self.spans = spans
        self.hashers = [hashing.new() for _ in spans]
        self.first = 0  # spans before this one have ended
        self.header = bytearray()
        self.pos = 0

    def feed(self, view: memoryview) -> None:
        start, end = self.pos, self.pos + len(view)
        hl = self.entry.header_length
        if start < hl:
            self.header += view[: min(end, hl) - start]
        spans = self.spans
        while self.first < len(spans) and spans[self.first][0] + spans[self.first][1] <= start:
            self.first += 1
        i = self.first
        while i < len(spans) and spans[i][0] < end:
            off, length = spans[i][0], spans[i][1]
            lo, hi = max(off, start), min(off + length, end)
            if lo < hi:
                self.hashers[i].update(view[lo - start : hi - start])
            i += 1
        self.pos = end

    def finish(self) -> None:
        """Raises IntegrityError naming the file (and tensor) if anything does not match."""
        if self.pos != self.entry.size:
            raise errors.IntegrityError(
                f"{self.where}: the source sent {self.pos} bytes but its manifest says "
                f"{self.entry.size} (a lying manifest, or a file replaced); nothing of step "
                f"{self.m.step} was committed",
                path=self.where,
                step=self.m.step,
            )
        for (_, _, want, key), h in zip(self.spans, self.hashers, strict=True):
            if h.hexdigest() != want:
                raise errors.IntegrityError(
                    f"{self.where}: tensor {key!r} does not match the hash in its manifest "
                    f"(corrupt source data or a lying manifest); nothing of step {self.m.step} "
                    "was committed — run `savegame verify` on the source",
                    path=self.where,
                    step=self.m.step,
                    key=key,
                )
        if manifest.is_ref(self.name):
            # A file shared with an earlier checkpoint (incremental saves) also holds tensors
            # this manifest does not list, so its file hash is not computable from it: every
            # chunk this checkpoint uses was checked above, and the size (as in
            # savegame.engine.reader).
            return
        got = hashing.file_hash(bytes(self.header), [s[2] for s in self.spans], path=self.where)
        if got != self.entry.hash:
            raise errors.IntegrityError(
                f"{self.where}: header does not match its hash in the manifest (corrupt source "
                f"or a lying manifest); nothing of step {self.m.step} was committed",
                path=self.where,
                step=self.m.step,
            )
