"""The Keras 3 ``.keras`` archive around the HDF5 weights: its zip layout, ``metadata.json`` and
``config.json`` read as data, and the weight shapes that ``config.json`` implies.

Key invariant: the archive is only ever read through :mod:`savegame.interop._zip`'s checked
directory (local headers, ranges, overlaps, duplicates), every member name stays inside the
archive root, JSON members are parsed as plain data (a Lambda layer's bytecode stays a string,
FORMATS.md §4.4), and ``model.weights.h5`` must be STORED so it can be read in place through a
bounded view of its byte range (no extraction). A ``.keras`` whose stored weights contradict
what ``config.json`` implies for the layers it describes (Dense, Conv, BatchNormalization, …)
is refused as edited or damaged.
"""

from __future__ import annotations

import io
import re
from typing import Any

from savegame import errors
from savegame.interop import _zip
from savegame.interop.keras import h5index, isolation

__all__ = ["check_config_shapes", "merge_meta", "zip_layout"]

_MAX_JSON_BYTES = h5index.MAX_JSON_CHARS  # JSON members of a .keras zip


# --------------------------------------------------------------------------------------------
# config.json versus the stored weights
# --------------------------------------------------------------------------------------------


def _snake(name: str) -> str:
    """Keras' ``naming.to_snake_case``: the attribute name a layer's weights are saved under."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _dims(value: Any) -> list[int | None] | None:
    if not isinstance(value, list) or not all(v is None or type(v) is int for v in value):
        return None
    return list(value)


def _expected_weights(
    cls: str, cfg: dict[str, Any], in_shape: list[int | None]
) -> list[tuple[str, list[int | None]]] | None:
    """(weight name, shape) in variable order for the layers whose weights follow from their
    config and input shape (keras/src/layers/…); ``None`` for any other layer."""
    last = in_shape[-1] if in_shape else None
    if cls == "Dense":
        units = cfg.get("units")
        if type(units) is not int:
            return None
        out = [("kernel", [last, units])]
        return out + [("bias", [units])] if cfg.get("use_bias", True) else out
    match = re.fullmatch(r"Conv([123])D", cls)
    if match:
        rank = int(match.group(1))
        filters, size = cfg.get("filters"), _dims(cfg.get("kernel_size"))
        groups = cfg.get("groups", 1)
        if type(filters) is not int or size is None or len(size) != rank:
            return None
        if type(groups) is not int or groups < 1:
            return None
        channels = (
            last
            if cfg.get("data_format", "channels_last") == "channels_last"
            else (in_shape[1] if len(in_shape) > 1 else None)
        )
        per_group = channels // groups if channels is not None and channels % groups == 0 else None
        out = [("kernel", [*size, per_group, filters])]
        return out + [("bias", [filters])] if cfg.get("use_bias", True) else out
    if cls in ("BatchNormalization", "LayerNormalization"):
        axis = cfg.get("axis", -1)
        if isinstance(axis, list) and len(axis) == 1:
            axis = axis[0]
        if type(axis) is not int or not -len(in_shape) <= axis < len(in_shape):
            return None
        n = in_shape[axis]
        names = (["gamma"] if cfg.get("scale", True) else []) + (
            ["beta"] if cfg.get("center", True) else []
        )
        if cls == "BatchNormalization":
            names += ["moving_mean", "moving_variance"]
        return [(w, [n]) for w in names]
    if cls == "Embedding":
        dim_in, dim_out = cfg.get("input_dim"), cfg.get("output_dim")
        if type(dim_in) is not int or type(dim_out) is not int:
            return None
        return [("embeddings", [dim_in, dim_out])]
    return None


def check_config_shapes(path: str, index: dict[str, Any]) -> None:
    """Refuse a ``.keras`` whose weights disagree with the shapes its ``config.json`` implies."""
    config = index["meta"].get("model_config")
    inner = config.get("config") if isinstance(config, dict) else None
    layers = inner.get("layers") if isinstance(inner, dict) else None
    if not isinstance(layers, list):
        return
    labels = index["meta"].get("layer_names") or {}
    by_label = {label: group for group, label in labels.items()}
    used: dict[str, int] = {}
    entries = index["entries"]
    for layer in layers:
        if not isinstance(layer, dict) or not isinstance(layer.get("class_name"), str):
            continue
        cls = layer["class_name"]
        cfg = layer.get("config")
        if cls == "InputLayer" or not isinstance(cfg, dict):
            continue
        # Keras saves each layer under layers/<snake_case class>[_N] (FORMATS.md §4.2); newer
        # versions also record the user-given name, which is preferred when present.
        snake = _snake(cls)
        if snake in used:
            used[snake] += 1
            snake = f"{snake}_{used[snake]}"
        else:
            used[snake] = 0
        label = cfg.get("name")
        group = by_label.get(label) if isinstance(label, str) else None
        group = group if group is not None else f"layers/{snake}"
        build = layer.get("build_config")
        in_shape = _dims(build.get("input_shape")) if isinstance(build, dict) else None
        if in_shape is None:
            continue
        expected = _expected_weights(cls, cfg, in_shape)
        if expected is None:
            continue
        stored = [k for k in entries if k.rpartition("/")[0] == f"{group}/vars"]
        if not stored:
            continue  # nothing saved under that name: nothing to contradict
        who = f"layer {label if isinstance(label, str) else group!r} ({cls})"
        if len(stored) != len(expected):
            raise errors.FormatError(
                f"{path}: {who} has {len(stored)} weights under {group}/vars but config.json "
                f"implies {len(expected)} ({', '.join(w for w, _ in expected)}); the archive is "
                "inconsistent (edited or damaged)",
                path=path,
                key=f"{group}/vars",
            )
        for i, (wname, shape) in enumerate(expected):
            key = f"{group}/vars/{i}"
            got = entries.get(key, {}).get("shape")
            if (
                got is None
                or len(got) != len(shape)
                or any(
                    want is not None and want != have
                    for want, have in zip(shape, got, strict=False)
                )
            ):
                want_s = "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
                raise errors.FormatError(
                    f"{path}: {who} weight {wname!r} ({key}) has shape {tuple(got or ())} but "
                    f"config.json implies {want_s}; the archive is inconsistent (edited or "
                    "damaged)",
                    path=path,
                    key=key,
                )


# --------------------------------------------------------------------------------------------
# .keras zip
# --------------------------------------------------------------------------------------------


def _zip_members(raw: io.BufferedReader, path: str, file_size: int) -> dict[str, _zip.ZipMember]:
    """Checked zip directory (``_zip``: local headers, ranges, overlaps, duplicates), plus
    member names that stay inside the archive root (FORMATS.md §1.6)."""
    members: dict[str, _zip.ZipMember] = {}
    for member in _zip.read_directory(raw, path, file_size):
        name = member.name
        parts = name.replace("\\", "/").split("/")
        if name.startswith("/") or "\\" in name or "\x00" in name or ".." in parts or ":" in name:
            raise errors.UnsafeContentError(
                f"{path} has zip member {name!r} outside the archive root", path=path, key=name
            )
        members[name] = member
    return members


def zip_layout(
    raw: io.BufferedReader, path: str, file_size: int
) -> tuple[int, int, dict[str, Any]]:
    """(start, size) of the STORED ``model.weights.h5`` member and the JSON metadata."""
    members = _zip_members(raw, path, file_size)
    meta: dict[str, Any] = {}
    if "metadata.json" in members:
        data = isolation.parse_json(
            _zip.read_member(raw, members["metadata.json"], path, max_bytes=_MAX_JSON_BYTES),
            what="metadata.json",
            path=path,
        )
        if isinstance(data, dict):
            for key in ("keras_version", "date_saved", "backend"):
                if key in data:
                    meta[key] = data[key]
    if "config.json" in members:
        # Data only: a Lambda layer's bytecode stays a string (FORMATS.md §4.4).
        meta["model_config"] = isolation.parse_json(
            _zip.read_member(raw, members["config.json"], path, max_bytes=_MAX_JSON_BYTES),
            what="config.json",
            path=path,
        )
    if "model.weights.h5" not in members:
        if "model.weights.npz" in members:
            raise errors.UnsupportedFormatError(
                f"{path} stores its weights as model.weights.npz, which this reader does not "
                "support; open that member with the numpy reader",
                path=path,
            )
        raise errors.FormatError(
            f"{path} is a zip without model.weights.h5; not a .keras file", path=path
        )
    member = members["model.weights.h5"]
    if member.method != _zip.STORED or member.compressed != member.size:
        raise errors.UnsafeContentError(
            f"{path}: model.weights.h5 is compressed (method {member.method}); Keras stores "
            "it uncompressed and we read it in place, so refusing",
            path=path,
        )
    return member.start, member.size, meta


def merge_meta(zip_meta: dict[str, Any], index: dict[str, Any]) -> None:
    """Fold the archive's JSON metadata (from :func:`zip_layout`) into the HDF5 index's."""
    # metadata.json's version and backend win over HDF5 attributes; config.json is the config
    # unless the HDF5 file carries its own model_config attribute.
    meta = index["meta"]
    for key, value in zip_meta.items():
        if key == "model_config" and meta.get("model_config") is not None:
            continue
        meta[key] = value
