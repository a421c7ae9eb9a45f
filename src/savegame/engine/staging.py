"""Stage: copy the state's tensors into a pool of host buffers, so training can go on.

The pool is allocated once (per tensor key, sized to its first snapshot) and reused by every
later save, so host memory does not grow with the number of saves (the bug class of
pytorch/pytorch#170163). CUDA tensors are copied into *pinned* buffers on a side stream in large
chunks; contiguous CPU tensors by the fastest of three ways of copying host memory *on this
machine*, chosen by measuring them on the real snapshots (:class:`CopyChoice`):

- ``memmove``: one ``ctypes.memmove`` per tensor on the calling thread (GIL released);
- ``threads``: one thread per usable core (the calling thread is one), each moving pieces of
  the bytes by ``memmove``, the next piece in order as soon as it is free;
- ``torch``: ``copy_`` of byte views, parallelised by torch over its intra-op threads.

Why measure rather than fix one: a copy is memory-bound and which way reaches the bandwidth
depends on the machine and on what else runs on it. On the 2-vCPU CI VM the same day gave
opposite answers: 2026-11-23 ``copy_`` with 2 threads 123-160 ms vs ``memmove`` 66-87 ms for
1 GB (15 fresh processes), while the async benchmark that afternoon had ``copy_`` at 0.160 s vs
``memmove`` 0.294 s for 2 GB; issue 14's run had ``copy_`` 0.101 s beat it again; and on
2026-11-30 (load 5-9) four runs of bench_async measured memmove / threads / ``copy_`` at 3.7 /
4.3 / 3.0, 6.6 / 6.3 / 6.2, 3.3 / 4.3 / 4.3 and 5.4 / 5.2 / 4.6 GB/s: no method always wins.
Measuring costs nothing extra: while undecided, one snapshot is split between the candidates
(each copies its share of the bytes, timed on its own), and after a few such snapshots the
fastest per byte copies everything (``memmove`` unless another is 5% faster: one thread leaves
the other cores to training). A snapshot into newly allocated buffers, as the first, is not
measured (its page faults would be). The choice is per process and size class, and is measured
again now and then (the machine's load changes). Small snapshots (under :data:`SMALL_BYTES`)
are always one ``memmove`` per tensor: there, starting threads costs more than it saves.
Non-contiguous sources (and conj/neg views) go through ``copy_``. The reader copies verified
bytes into live tensors through :func:`copy_choice` too (``"restore"``; fixed to ``threads``).

Invariant: :meth:`HostPool.stage` returns only once every byte of the snapshot is in host
memory that nothing but the persist worker touches — mutating the live tensors afterwards can
never change the checkpoint (pytorch/pytorch#144657, Lightning #20953). The caller must not
stage again until the previous snapshot has been persisted (one save in flight).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "BOUNCE_BYTES",
    "METHODS",
    "SMALL_BYTES",
    "CopyChoice",
    "HostPool",
    "copy_choice",
    "copy_to_device",
]

#: The ways of copying contiguous host memory that :class:`CopyChoice` chooses between.
METHODS = ("memmove", "threads", "torch")
#: A snapshot of fewer contiguous CPU bytes is copied by one ``memmove`` per tensor, unmeasured.
SMALL_BYTES = 32 << 20
#: Share boundaries of the ``threads`` method fall on multiples of this (whole pages).
_ALIGN = 1 << 12
#: Buffers carved from reserved memory start on multiples of this (a cache line, and more than
#: any dtype's alignment).
_ALIGN_BUF = 64

#: One contiguous copy: (destination address, source address, bytes).
Segment = tuple[int, int, int]


class HostPool:
    """Reusable host buffers, one per tensor key.

    Args:
        pin: Use pinned (page-locked) buffers for CUDA sources; default: when CUDA is available.
        choice: How contiguous CPU copies are made; default: the process-wide :func:`copy_choice`.
    """

    def __init__(self, *, pin: bool | None = None, choice: CopyChoice | None = None) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._pin = torch.cuda.is_available() if pin is None else pin
        self._stream: torch.cuda.Stream | None = None
        self._choice = choice
        # Host memory faulted in ahead of the first snapshot (:meth:`reserve`): new CPU buffers
        # are carved from it. ``_arena_at``: the first free byte.
        self._arena: torch.Tensor | None = None
        self._arena_at = 0
        self._reserving: threading.Thread | None = None
        self._reserved: list[torch.Tensor] = []  # the reserving thread's result

    def reserve(self, nbytes: int) -> None:
        """Fault in ``nbytes`` of pageable host memory on a background thread, for the CPU
        buffers of the first snapshot to be carved from.

        Into new buffers the first snapshot pays their page faults on the training thread: 1 GB
        took 1.3 s where a copy into touched memory takes 0.12 s (2-vCPU VM, 2026-12-01).
        Touching the pages here, between two training steps, takes that out of the first save's
        stall. One call per pool: the memory stays the pool's (it would be allocated by the
        first save anyway); what the snapshot does not use is held until the pool is dropped.
        """
        if nbytes <= 0 or self._arena is not None or self._reserving is not None:
            return
        out = self._reserved

        def touch() -> None:
            try:
                arena = torch.empty(nbytes, dtype=torch.uint8)
                base = arena.data_ptr()
                step = _PIECE_BYTES
                for off in range(0, nbytes, step):  # ctypes releases the GIL: training goes on
                    ctypes.memset(base + off, 0, min(step, nbytes - off))
                out.append(arena)
            except (RuntimeError, MemoryError):  # no memory now: the first save allocates
                pass

        self._reserving = threading.Thread(target=touch, name="savegame-reserve", daemon=True)
        self._reserving.start()

    def _take_reserve(self) -> None:
        """Wait for :meth:`reserve`'s thread (if any) and adopt its memory."""
        if self._reserving is None:
            return
        self._reserving.join()
        self._reserving = None
        if self._reserved:
            self._arena, self._arena_at = self._reserved.pop(), 0

    def _carve(self, src: torch.Tensor) -> torch.Tensor | None:
        """A buffer shaped like ``src`` from the reserved memory, or None if it has no room."""
        if self._arena is None or src.device.type != "cpu":
            return None
        size = _ALIGN_BUF * -(-max(src.numel() * src.element_size(), 1) // _ALIGN_BUF)
        if self._arena_at + size > self._arena.numel():
            return None
        piece = self._arena[self._arena_at : self._arena_at + src.numel() * src.element_size()]
        self._arena_at += size
        return piece.view(src.dtype).view(src.shape)

    @property
    def nbytes(self) -> int:
        """Host memory held by the pool."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _buffer(self, key: str, src: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The buffer for ``key`` and whether it was just allocated (its pages not yet touched)."""
        buf = self._buffers.get(key)
        pin = self._pin and src.device.type == "cuda"
        # Reallocate only when the tensor changed shape/dtype or moved between host and device
        # (a pageable buffer would make the CUDA copy synchronous and slow); otherwise reuse.
        if (
            buf is None
            or buf.shape != src.shape
            or buf.dtype != src.dtype
            or (pin and not buf.is_pinned())
        ):
            carved = None if pin else self._carve(src)
            if carved is not None:  # already faulted in
                self._buffers[key] = carved
                return carved, False
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
            self._buffers[key] = buf
            return buf, True
        return buf, False

    def stage(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy ``tensors`` into the pool; returns ``{key: host buffer}`` (a consistent snapshot).

        Keys absent from ``tensors`` are dropped from the pool, so its size follows the state.
        """
        self._take_reserve()
        staged: dict[str, torch.Tensor] = {}
        cuda_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        plain: list[tuple[torch.Tensor, torch.Tensor]] = []  # contiguous CPU: raw byte copies
        fresh = False  # some buffer was just allocated
        for key, t in tensors.items():
            src = t.detach()
            buf, new = self._buffer(key, src)
            if src.device.type == "cuda":
                cuda_pairs.append((buf, src))
            elif src.device.type == "cpu":
                if _raw_copyable(buf, src):
                    plain.append((buf, src))
                    fresh = fresh or new
                else:
                    buf.copy_(src)
            else:  # mps, xla, ...: synchronous copy through the framework
                buf.copy_(src.to("cpu"))
            staged[key] = buf
        if plain:
            # Into new buffers the copy takes their page faults: that would be measured, not
            # the copy (faulting them in first by a parallel fill made the first save slower).
            (self._choice or copy_choice()).copy(plain, measure=not fresh)
        if cuda_pairs:
            self._copy_from_cuda(cuda_pairs)
        for key in list(self._buffers):
            if key not in tensors:
                del self._buffers[key]
        return staged

    def _copy_from_cuda(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        # Copy on a side stream that first waits for the compute stream, so we read the values
        # as of this call; then block until the copies are done (the stall floor: D2H bandwidth).
        if self._stream is None:
            self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        compute = torch.cuda.current_stream()
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            for buf, src in pairs:
                buf.copy_(src, non_blocking=True)
                src.record_stream(self._stream)
        self._stream.synchronize()


def _raw_copyable(buf: torch.Tensor, src: torch.Tensor) -> bool:
    # A conj/neg view shares its base's bytes and only flags the math: bytes would be wrong.
    return (
        not (src.is_conj() or src.is_neg())
        and src.is_contiguous()
        and src.dtype == buf.dtype
        and src.numel() == buf.numel()
    )


@dataclass
class _Class:
    """What is known about one size class: seconds and bytes measured per method."""

    seconds: dict[str, float] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)
    trials: int = 0
    chosen: str | None = None
    since: int = 0  # copies with the chosen method since it was chosen


class CopyChoice:
    """Chooses, by measurement, how contiguous host memory is copied (module docstring).

    Args:
        methods: The candidates; default :data:`METHODS` (``threads`` only with 2+ cores).
        trials: Split snapshots measured before choosing.
        recheck: After this many snapshots with the chosen method, one is split again and the
            choice made anew from that measurement and the earlier ones (halved).
        threads: Threads of the ``threads`` method; default the usable cores, at most 8.
    """

    def __init__(
        self,
        methods: Sequence[str] | None = None,
        *,
        trials: int = 2,
        recheck: int = 64,
        threads: int | None = None,
    ) -> None:
        self.threads = threads or min(8, _cores())
        if methods is None:
            methods = [m for m in METHODS if m != "threads" or self.threads > 1]
        unknown = set(methods) - set(METHODS)
        if unknown or not methods:
            raise ValueError(f"copy methods must be some of {METHODS}, got {list(methods)}")
        self.methods = tuple(methods)
        self.trials = trials
        self.recheck = recheck
        self._classes: dict[int, _Class] = {}
        self._lock = threading.Lock()

    def chosen(self, nbytes: int) -> str | None:
        """The method chosen for snapshots of ``nbytes`` bytes, or None while undecided."""
        if nbytes < SMALL_BYTES:
            return "memmove"
        if len(self.methods) == 1:
            return self.methods[0]
        with self._lock:
            cls = self._classes.get(_size_class(nbytes))
            return None if cls is None else cls.chosen

    def rates(self, nbytes: int) -> dict[str, float]:
        """Bytes per second measured so far for each method, for snapshots of ``nbytes`` bytes."""
        with self._lock:
            cls = self._classes.get(_size_class(nbytes)) or _Class()
            return {m: cls.nbytes[m] / cls.seconds[m] for m in cls.seconds if cls.seconds[m] > 0}

    def copy(
        self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], *, measure: bool = True
    ) -> None:
        """Copy every ``(dest, src)`` pair (contiguous CPU tensors of equal dtype and size).

        ``measure``: whether this copy may be timed (False: its destination pages are not
        faulted in yet, which would be measured instead of the copy).
        """
        self.copy_segments(
            [(d.data_ptr(), s.data_ptr(), s.numel() * s.element_size()) for d, s in pairs],
            measure=measure,
        )

    def copy_segments(self, segments: Sequence[Segment], *, measure: bool = True) -> None:
        """Copy raw ``(dest address, source address, bytes)`` ranges of host memory (they must
        not overlap; the caller keeps both sides alive), like :meth:`copy`."""
        segments = [seg for seg in segments if seg[2]]
        total = sum(n for _, _, n in segments)
        if total < SMALL_BYTES or len(self.methods) == 1:
            _COPIERS[self.methods[0] if total >= SMALL_BYTES else "memmove"](segments, self.threads)
            return
        key = _size_class(total)
        with self._lock:
            cls = self._classes.setdefault(key, _Class())
            method = cls.chosen
            split = measure and (method is None or cls.since >= self.recheck)
            if method is not None and not split:
                cls.since += 1
        if not split:
            _COPIERS[method or "memmove"](segments, self.threads)
            return
        # Measure: each candidate copies an equal share of the bytes, timed on its own.
        shares = _cut(segments, len(self.methods), _ALIGN)
        took: dict[str, float] = {}
        for name, share in zip(self.methods, shares, strict=True):
            t0 = time.perf_counter()
            _COPIERS[name](share, self.threads)
            took[name] = time.perf_counter() - t0
        with self._lock:
            if cls.chosen is not None:  # a recheck: older figures count half
                for m in cls.seconds:
                    cls.seconds[m] /= 2
                    cls.nbytes[m] //= 2
            for name, share in zip(self.methods, shares, strict=True):
                cls.seconds[name] = cls.seconds.get(name, 0.0) + took[name]
                cls.nbytes[name] = cls.nbytes.get(name, 0) + sum(n for _, _, n in share)
            cls.trials += 1
            if cls.chosen is not None or cls.trials >= self.trials:
                cls.chosen = _pick(
                    {m: cls.nbytes[m] / max(cls.seconds[m], 1e-9) for m in self.methods}
                )
                cls.since = 0


#: A method must be this much faster than ``memmove`` to be chosen over it.
_MARGIN = 1.05


def _pick(rates: Mapping[str, float]) -> str:
    """The fastest method (bytes/s), but ``memmove`` unless another beats it by :data:`_MARGIN`:
    within the noise, one thread is better (it leaves the other cores to training)."""
    best = max(rates, key=lambda m: rates[m])
    if "memmove" in rates and rates["memmove"] * _MARGIN >= rates[best]:
        return "memmove"
    return best


def _size_class(nbytes: int) -> int:
    # Classes a factor of 2 apart: one training run's snapshots all fall into one.
    return max(0, nbytes.bit_length() - 1)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _cut(segments: Sequence[Segment], parts: int, align: int) -> list[list[Segment]]:
    """Cut the byte stream of ``segments`` into ``parts`` consecutive shares of (nearly) equal
    size; a cut inside a segment falls on the nearest multiple of ``align`` from its start.
    Shares may be empty."""
    total = sum(n for _, _, n in segments)
    bounds = [total * (k + 1) // parts for k in range(parts)]
    shares: list[list[Segment]] = [[] for _ in range(parts)]
    i = pos = 0  # current share, position in the stream
    for dst, src, n in segments:
        off = 0
        while off < n:
            if i < parts - 1 and pos + (n - off) > bounds[i]:
                end = off + (bounds[i] - pos)
                end = min(max((end + align // 2) // align * align, off), n)
                if end > off:
                    shares[i].append((dst + off, src + off, end - off))
                    pos += end - off
                    off = end
                i += 1
                continue
            shares[i].append((dst + off, src + off, n - off))
            pos += n - off
            off = n
    return shares


def _by_memmove(segments: Sequence[Segment], threads: int) -> None:
    for dst, src, n in segments:
        ctypes.memmove(dst, src, n)


def _by_threads(segments: Sequence[Segment], threads: int) -> None:
    # ctypes releases the GIL around the call: each thread moves its pieces at full speed.
    # Threads are started per copy (tens of microseconds; a snapshot takes tens of ms): nothing
    # stays running between saves. The bytes are cut into several pieces per thread, taken in
    # order by whichever thread is free: with one equal share each, a thread whose core is
    # busy with something else (another process on a 2-vCPU VM) held the whole copy back.
    threads = max(1, threads)
    total = sum(n for _, _, n in segments)
    parts = max(1, min(threads * _PIECES, total // _PIECE_BYTES))
    pieces = [p for p in _cut(segments, parts, _ALIGN) if p]
    errors: list[BaseException] = []
    lock = threading.Lock()
    taken = [0]

    def run() -> None:
        try:
            while True:
                with lock:
                    i = taken[0]
                    taken[0] += 1
                if i >= len(pieces) or errors:
                    return
                _by_memmove(pieces[i], 1)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(exc)

    workers = [
        threading.Thread(target=run, daemon=True) for _ in range(min(threads, len(pieces)) - 1)
    ]
    for w in workers:
        w.start()
    try:
        run()
    finally:
        for w in workers:
            w.join()
    if errors:
        raise errors[0]


#: The ``threads`` method cuts a copy into this many pieces per thread, ...
_PIECES = 16
#: ... each of at least this many bytes.
_PIECE_BYTES = 4 << 20


def _by_torch(segments: Sequence[Segment], threads: int) -> None:
    # Byte views of the raw ranges: torch parallelises each large copy over its intra-op threads.
    for dst, src, n in segments:
        _bytes_at(dst, n).copy_(_bytes_at(src, n))


class _Raw:
    """``n`` bytes of host memory at ``address``, as numpy's array interface describes them (a
    ctypes array type per length would be cached by ctypes forever)."""

    def __init__(self, address: int, n: int) -> None:
        self.__array_interface__ = {
            "data": (address, False),
            "shape": (n,),
            "typestr": "|u1",
            "version": 3,
        }


def _bytes_at(address: int, n: int) -> torch.Tensor:
    """A uint8 tensor over ``n`` bytes of host memory at ``address`` (no copy; the caller keeps
    the owner alive)."""
    import numpy as np

    return torch.from_numpy(np.asarray(_Raw(address, n)))


#: A restore moves verified host bytes to a GPU through pinned buffers of this size ...
BOUNCE_BYTES = 32 << 20
#: ... this many: host threads fill one while the copies out of the others cross.
BOUNCES = 4

#: One copy to a device: (destination: a contiguous uint8 view of the region on the device,
#: source address in host memory, bytes).
DeviceCopy = tuple[torch.Tensor, int, int]


def copy_to_device(copies: Sequence[DeviceCopy]) -> None:
    """Copy host bytes into CUDA tensors: each ``(dest, source address, n)`` moves ``n`` bytes
    at the address into ``dest`` (contiguous, ``n`` bytes). Returns when every byte arrived.

    Written by hand because nothing does it: ``copy_`` from pageable memory (a mapped
    checkpoint file) is synchronous and goes through the driver's own small staging buffer,
    one tensor after the other, so the host copy and the bus never overlap. On an H200 VM
    (2026-11-30, bench_async --device cuda, 3.2 GB) the restore's copy from host memory to
    the GPU by ``load_state_dict`` took ~0.53 s (6 GB/s) against 55 GB/s for a copy from
    pinned memory. Here the host's threads fill a pinned buffer (at the memcpy rate of every
    core) while the previous buffers cross on a side stream; a buffer is refilled only after
    its copies are done (an event). Not yet run on a GPU: see ``reader.gpu_direct``.
    """
    by_device: dict[torch.device, list[DeviceCopy]] = {}
    for dest, src, n in copies:
        if n:
            by_device.setdefault(dest.device, []).append((dest, src, n))
    for device, group in by_device.items():
        total = sum(n for _, _, n in group)
        size = min(BOUNCE_BYTES, total)
        with torch.cuda.device(device):
            try:
                bufs = [
                    torch.empty(size, dtype=torch.uint8, pin_memory=True)
                    for _ in range(min(BOUNCES, -(-total // size)))
                ]
            except RuntimeError:  # no page-locked memory to be had (a low memlock limit)
                for dest, src, n in group:  # the slow, plain way: pageable, one at a time
                    dest.reshape(-1).copy_(_bytes_at(src, n))
                continue
            stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            # Work queued on the destinations before this call (their initialisation) first.
            stream.wait_stream(torch.cuda.current_stream(device))
            events: list[torch.cuda.Event | None] = [None] * len(bufs)
            try:
                for k, (segments, sends) in enumerate(
                    bounce_plan(group, size, [b.data_ptr() for b in bufs])
                ):
                    i = k % len(bufs)
                    ready = events[i]
                    if ready is not None:
                        ready.synchronize()  # this buffer's last copies have left it
                    fill = sum(n for _, _, n in segments)
                    _COPIERS["threads" if fill >= _PIECE_BYTES else "memmove"](segments, _cores())
                    with torch.cuda.stream(stream):
                        for view, off, n in sends:
                            view.copy_(bufs[i][off : off + n], non_blocking=True)
                        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                        event.record(stream)
                        events[i] = event
            finally:
                # Also when something above raised: no copy may land after this returns.
                stream.synchronize()


def bounce_plan(
    copies: Sequence[DeviceCopy], size: int, buffers: Sequence[int]
) -> list[tuple[list[Segment], list[tuple[torch.Tensor, int, int]]]]:
    """The rounds of :func:`copy_to_device`: round ``k`` fills buffer ``k % len(buffers)``
    (addresses) with its host ``segments`` and then sends ``(dest view, offset in the buffer,
    bytes)``; a copy larger than what is left of a buffer is split across rounds."""
    rounds: list[tuple[list[Segment], list[tuple[torch.Tensor, int, int]]]] = []
    segments: list[Segment] = []
    sends: list[tuple[torch.Tensor, int, int]] = []
    fill = 0
    for dest, src, n in copies:
        flat = dest.reshape(-1)
        done = 0
        while done < n:
            take = min(n - done, size - fill)
            base = buffers[len(rounds) % len(buffers)]
            segments.append((base + fill, src + done, take))
            sends.append((flat[done : done + take], fill, take))
            fill += take
            done += take
            if fill == size:
                rounds.append((segments, sends))
                segments, sends, fill = [], [], 0
    if segments:
        rounds.append((segments, sends))
    return rounds


_COPIERS: dict[str, Callable[[Sequence[Segment], int], None]] = {
    "memmove": _by_memmove,
    "threads": _by_threads,
    "torch": _by_torch,
}

_defaults: dict[str, CopyChoice] = {}
_defaults_lock = threading.Lock()


def copy_choice(purpose: str = "stage") -> CopyChoice:
    """The process-wide :class:`CopyChoice` for ``purpose``: ``"stage"`` (every
    :class:`HostPool` by default, so every checkpointer of a process shares what was measured)
    or ``"restore"`` (the reader's copy of verified bytes from a mapped file into live tensors:
    a different source, measured on its own)."""
    with _defaults_lock:
        choice = _defaults.get(purpose)
        if choice is None:
            # A restore copies once per process, usually, so a split would be most of what
            # it ever does: it uses ``threads`` (``memmove`` on one core), which was never
            # clearly behind on the CI VM and is ahead where the live tensors were never
            # touched (a fresh process: the page faults are taken on every core). 1 GB from a
            # mapped checkpoint into live tensors, 2026-11-30, load 4-7, GB/s: threads 7.1,
            # 7.5, 5.1; memmove 7.4, 5.6, 3.1; torch ``copy_`` 4.0, 3.7 (the old way: the
            # warm restore went from 1.12x to 0.76x the fastest peer in one interleaved run).
            methods = None
            if purpose == "restore":
                methods = ["threads"] if _cores() > 1 else ["memmove"]
            choice = _defaults[purpose] = CopyChoice(methods)
        return choice
