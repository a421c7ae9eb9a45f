"""Suite-wide hooks: keep the suite correct and cheap under pytest-xdist (``-n 2 --dist loadgroup``,
the README's test command), and unchanged without it (``python -m pytest tests/x.py``).

xdist runs each test on whichever worker is free, and every worker is its own interpreter. So a
module-scoped fixture (an uninterrupted reference run, a trained model, a server) would be built
once per worker that runs a test of its module, and a module-level cache (``_REFERENCES`` in
tests/distributed/test_campaign.py) would be filled twice. Those modules are kept whole on one
worker; every other test is scheduled on its own, the multi-process ones first. Nothing here
skips, reorders or changes a test in a plain run.

Why a scheduler and not ``xdist_group`` marks: xdist 3.8 groups by appending ``@group`` to
``item._nodeid``, which pytest 9.2 no longer reads (``Node.nodeid`` is built from ``_id``), so
the marks silently group nothing. The grouping below works from the node ids alone.
"""

from __future__ import annotations

import functools
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

#: Modules that share an expensive result between their tests through a module-level cache
#: rather than a fixture (so the fixture-scope check below does not see them).
_SHARED_BY_MODULE_CACHE = {"tests/distributed/test_campaign.py"}
_WIDE_SCOPE = re.compile(r"""scope\s*=\s*["'](module|package|class)["']""")
_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _keeps_module_state(path: str) -> bool:
    """Whether the tests of ``path`` (a node id's file part) share state within their module: a
    module/package/class-scoped fixture in the file or in a conftest.py above it, or a cache."""
    if path in _SHARED_BY_MODULE_CACHE:
        return True
    file = _ROOT / path
    sources = [file] + [d / "conftest.py" for d in file.parents if d.is_relative_to(_ROOT)]
    for src in sources:
        try:
            if _WIDE_SCOPE.search(src.read_text(encoding="utf-8")):
                return True
        except OSError:
            continue
    return False


@pytest.hookimpl(optionalhook=True)  # an xdist hook: a run without xdist installed ignores it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``--dist loadgroup``: a test's work unit is its whole file when the file keeps module
    state (see above), else the test alone; explicit ``xdist_group`` ids are still honoured."""
    if config.getvalue("dist") != "loadgroup":
        return None  # xdist's own scheduler
    from xdist.scheduler import LoadGroupScheduling

    class _ModuleStateScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):
                return super()._split_scope(nodeid)
            path = nodeid.split("::", 1)[0]
            return path if _keeps_module_state(path) else nodeid

    return _ModuleStateScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Collection runs in the workers, where xdist has set ``dist`` to "no" and recorded the mode
    # as ``loadgroup``; a plain run keeps its order.
    if not getattr(config.option, "loadgroup", False):
        return
    # Multi-process tests (torchrun, forked gloo ranks: 10-90 s each) first: xdist hands out
    # work in this order, so the long units start early and the many short tests fill the end
    # instead of one worker finishing a minute-long job while the other idles. A stable sort,
    # so each module's tests stay together and module fixtures are built once per worker.
    items.sort(key=lambda item: item.get_closest_marker("distributed") is None)


_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


#: The handlers this process started with (an xdist worker's, or a plain run's).
_BASELINE = {s: signal.getsignal(s) for s in _SIGNALS}


def _open_chain() -> list[Any]:
    """The Checkpointers whose preemption handlers are installed in this process (oldest first);
    empty when savegame's signal module was never imported."""
    mod = sys.modules.get("savegame.checkpointer.signals")
    return list(getattr(mod, "_chain", ()))


@pytest.fixture(autouse=True)
def _signal_handlers_given_back(request: pytest.FixtureRequest) -> Any:
    """Every test gives back the process's signal handlers and closes the Checkpointers it
    opened. A test that leaves one open (or a handler of its own) would make a later test on the
    same xdist worker see Ctrl-C noted instead of raised — an order-dependent failure far from its
    cause. Here the test that leaks fails itself, by name, and the next one starts clean."""
    before = {s: signal.getsignal(s) for s in _SIGNALS}
    chain = _open_chain()
    if before != _BASELINE or chain:
        # Changed between tests (a module fixture's teardown, a thread): start this test clean
        # and say where it was found; the test that changed them is the one that ran before.
        mod = sys.modules.get("savegame.checkpointer.signals")
        if mod is not None:
            with mod._chain_lock:
                mod._chain.clear()
        for s, h in _BASELINE.items():
            signal.signal(s, h)
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # shown in the summary; not an error of this test
            warnings.warn(
                f"signal handlers were changed before {request.node.nodeid} ({before!r}, "
                f"{len(chain)} Checkpointer(s) open): reset",
                stacklevel=1,
            )
        before, chain = dict(_BASELINE), []
    yield
    after = {s: signal.getsignal(s) for s in _SIGNALS}
    leaked = [c for c in _open_chain() if c not in chain]
    changed = {signal.Signals(s).name: h for s, h in after.items() if h != before[s]}
    if not leaked and not changed:
        return
    mod = sys.modules.get("savegame.checkpointer.signals")
    if mod is not None:
        with mod._chain_lock:
            mod._chain[:] = [c for c in mod._chain if c not in leaked]
    for s, h in before.items():
        signal.signal(s, h)
    pytest.fail(
        f"{request.node.nodeid} left {len(leaked)} Checkpointer(s) open (their preemption "
        f"handlers installed) and changed these signal handlers: {changed!r}; close what the test "
        "opens (a `with` block or try/finally) and restore any handler it sets",
        pytrace=False,
    )
