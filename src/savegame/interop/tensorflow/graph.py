"""TF2 object graph -> readable object paths (FORMATS.md §3.4).

A TF2 checkpoint stores its ``TrackableObjectGraph`` in the string tensor
``_CHECKPOINTABLE_OBJECT_GRAPH``; each node's attributes name the bundle keys that hold its
tensors. :func:`resolve` names every key by the object path to its node
(``model/layer_with_weights-0/kernel``), by the graph's structure, never by string patterns.

Key invariant: a hostile graph cannot blow up time or memory. The serialized graph is capped
(``_MAX_OBJECT_GRAPH_BYTES``), node and reference counts by ``LIMITS.max_entries``, path depth by
``_MAX_PATH_DEPTH`` (deeper nodes keep their raw key) and the total path text by
``_MAX_PATH_TEXT``; each node is finalised once, so the work is linear in the edges. Problems
raise :class:`savegame.errors.FormatError` keyed ``_CHECKPOINTABLE_OBJECT_GRAPH``; the reader
turns them into ``metadata()["object_graph_error"]`` and leaves the tensors readable.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from savegame import errors
from savegame.interop import base
from savegame.interop.tensorflow import proto

__all__ = ["OBJECT_GRAPH_KEY", "GraphNames", "resolve"]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VARIABLE_VALUE = "VARIABLE_VALUE"
# A TrackableObjectGraph is a few hundred bytes per variable; decoding expands it ~30x in
# Python objects, so it is capped well below LIMITS.max_header_bytes.
_MAX_OBJECT_GRAPH_BYTES = 64 << 20
# Object paths: real Keras graphs are < 20 edges deep; a deeper node keeps its raw key.
_MAX_PATH_DEPTH = 256
_MAX_PATH_TEXT = 64 << 20


@dataclass(frozen=True, slots=True)
class GraphNames:
    """What the object graph says about the bundle's keys.

    Attributes:
        paths: Raw key -> readable object path.
        full_names: Raw key -> the variable's own ``full_name`` (where the graph records one).
        keys: Every checkpoint key the graph names (``verify()`` checks they are in the index).
    """

    paths: dict[str, str]
    full_names: dict[str, str]
    keys: set[str]


def resolve(raw: bytes, path: str) -> GraphNames:
    """Decode the serialized object graph ``raw`` and name every checkpoint key by its path.

    Args:
        raw: The ``_CHECKPOINTABLE_OBJECT_GRAPH`` scalar string, CRC-checked by the caller.
        path: The checkpoint prefix, named in errors.

    Raises:
        savegame.errors.FormatError: The graph is over a cap or malformed.
    """
    if len(raw) > _MAX_OBJECT_GRAPH_BYTES:
        raise errors.FormatError(
            f"{path}: object graph is {len(raw)} bytes, above the "
            f"{_MAX_OBJECT_GRAPH_BYTES}-byte cap",
            path=path,
            key=OBJECT_GRAPH_KEY,
        )
    try:
        nodes = proto.decode_object_graph(
            raw, max_nodes=base.LIMITS.max_entries, max_refs=2 * base.LIMITS.max_entries
        )
    except proto.ProtoError as exc:
        raise errors.FormatError(
            f"{path}: object graph: {exc}", path=path, key=OBJECT_GRAPH_KEY
        ) from exc
    try:
        node_path = _node_paths(nodes)
    except proto.ProtoError as exc:
        raise errors.FormatError(
            f"{path}: object graph: {exc}", path=path, key=OBJECT_GRAPH_KEY
        ) from exc
    # Slot variables are not children; they hang off (variable, optimizer) pairs.
    budget = _MAX_PATH_TEXT
    for opt_id, node in enumerate(nodes):
        for var_id, slot, slot_id in node.slot_variables:
            if slot_id not in node_path and var_id in node_path and opt_id in node_path:
                p = f"{node_path[var_id]}/.OPTIMIZER_SLOT/{node_path[opt_id]}/{slot}"
                budget -= len(p)
                if budget < 0:
                    raise errors.FormatError(
                        f"{path}: object graph: slot variable paths exceed "
                        f"{_MAX_PATH_TEXT} characters",
                        path=path,
                        key=OBJECT_GRAPH_KEY,
                    )
                node_path[slot_id] = p
    out: dict[str, str] = {}
    full: dict[str, str] = {}
    keys: set[str] = set()
    for node_id, node in enumerate(nodes):
        for name, full_name, ckey in node.attributes:
            keys.add(ckey)
            if node_id not in node_path or ckey in out:
                continue
            p = node_path[node_id]
            if name != _VARIABLE_VALUE:
                p = f"{p}/{name}"
                budget -= len(p)
                if budget < 0:
                    raise errors.FormatError(
                        f"{path}: object graph: attribute paths exceed {_MAX_PATH_TEXT} characters",
                        path=path,
                        key=OBJECT_GRAPH_KEY,
                    )
            out[ckey] = p
            if full_name:
                full[ckey] = full_name
    return GraphNames(out, full, keys)


def _node_paths(nodes: proto.TrackableGraph) -> dict[int, str]:
    """Best path from the root (node 0) to every reachable node.

    Dijkstra on (edges named ``optimizer``, depth, discovery order): the shortest path, but a
    path through an optimizer only when there is no other (FORMATS.md §3.4: Keras 3 puts model
    weights under ``optimizer/_trainable_variables`` first). Each node is finalised once and
    its path built from its parent's, so the work is linear in the edges; nodes deeper than
    ``_MAX_PATH_DEPTH`` stay unnamed and the total path text is capped, so a hostile graph
    (long chains, cycles, many paths) cannot blow up time or memory.
    """
    if not nodes:
        return {}
    best: dict[int, tuple[int, int, int]] = {0: (0, 0, 0)}
    parent: dict[int, tuple[int, str]] = {}
    heap: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
    paths: dict[int, str] = {}
    seq = 0
    total = 0
    while heap:
        demoted, depth, _order, nid = heapq.heappop(heap)
        if nid in paths:
            continue
        if nid == 0:
            paths[0] = ""
        else:
            up, name = parent[nid]
            paths[nid] = f"{paths[up]}/{name}" if paths[up] else name
            total += len(paths[nid])
            if total > _MAX_PATH_TEXT:
                raise proto.ProtoError(f"object paths exceed {_MAX_PATH_TEXT} characters")
        if depth >= _MAX_PATH_DEPTH:
            continue
        for child, name in nodes[nid].children:
            if child in paths:
                continue
            seq += 1
            cost = (demoted + (name == "optimizer"), depth + 1, seq)
            if child not in best or cost < best[child]:
                best[child] = cost
                parent[child] = (nid, name)
                heapq.heappush(heap, (*cost, child))
    return paths
