from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from savegame import errors
from savegame import tree as treelib


def roundtrip(obj: object) -> object:
    skeleton, tensors = treelib.encode(obj)
    # the skeleton must survive strict JSON (no NaN literals, no non-str keys)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))
    return treelib.decode(skeleton, tensors)


def test_plain_values_round_trip_exactly() -> None:
    tree = {"a": 1, "b": 2.5, "c": True, "d": None, "e": "x", "f": [1, [2, 3]]}
    assert roundtrip(tree) == tree


@pytest.mark.parametrize("value", [2**53 + 1, -(2**63) + 3, 2**64 + 7, 12345678901234567890123])
def test_ints_beyond_2_pow_53_stay_exact(value: int) -> None:
    out = roundtrip({"v": value})
    assert out == {"v": value}
    assert type(out["v"]) is int  # type: ignore[index]


def test_nan_and_infinities_survive() -> None:
    out = roundtrip([math.nan, math.inf, -math.inf, -0.0])
    assert isinstance(out, list)
    assert math.isnan(out[0]) and out[1] == math.inf and out[2] == -math.inf
    assert math.copysign(1.0, out[3]) == -1.0


def test_bytes_tuples_sets_round_trip_with_exact_types() -> None:
    tree = {
        "b": b"\x00\xffabc",
        "t": (1, (2, "x")),
        "s": {3, 1, 2},
        "fs": frozenset({"a"}),
        "empty": (),
    }
    out = roundtrip(tree)
    assert out["b"] == b"\x00\xffabc" and type(out["b"]) is bytes  # type: ignore[index]
    assert out["t"] == (1, (2, "x")) and type(out["t"][1]) is tuple  # type: ignore[index]
    assert out["s"] == {1, 2, 3}  # type: ignore[index]
    assert out["fs"] == {"a"}  # type: ignore[index]
    assert out["empty"] == ()  # type: ignore[index]


def test_int_dict_keys_and_dollar_prefixed_str_keys_round_trip() -> None:
    tree = {"state": {0: {"step": 3}, 1: {"step": 4}}, "meta": {"$tensor": "not a tag", "$x": 1}}
    out = roundtrip(tree)
    assert out == tree
    assert list(out["state"]) == [0, 1]  # type: ignore[index]


def test_mixed_key_types_round_trip() -> None:
    tree = {"d": {1: "a", "b": 2, (1, 2): 3, None: 4, 2.5: 5, False: 6}}
    assert roundtrip(tree) == tree


def test_tensor_leaves_come_back_as_the_same_objects_by_key() -> None:
    t = torch.arange(6.0).reshape(2, 3)
    skeleton, tensors = treelib.encode({"model": {"w": t}, "list": [t.clone()]})
    assert set(tensors) == {"model/w", "list/0"}
    assert skeleton["model"]["w"] == {"$tensor": "model/w"}
    out = treelib.decode(skeleton, tensors)
    assert out["model"]["w"] is t


def test_keys_with_slashes_and_tildes_are_escaped_and_unique() -> None:
    skeleton, tensors = treelib.encode(
        {"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}, "~": torch.zeros(2)}
    )
    assert len(tensors) == 3
    assert treelib.split_key(treelib.join_key(["a/b", "~1", "x"])) == ["a/b", "~1", "x"]


@pytest.mark.parametrize(
    "dtype", [np.uint32, np.int64, np.float16, np.float64, np.bool_, np.int8, np.complex64]
)
def test_numpy_arrays_round_trip_with_dtype(dtype: type) -> None:
    arr = (np.arange(12) % 5).astype(dtype).reshape(3, 4)
    out = roundtrip({"a": arr})["a"]  # type: ignore[index]
    assert isinstance(out, np.ndarray) and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)


def test_uint32_array_with_high_values_round_trips() -> None:
    arr = np.array([0, 2**31, 2**32 - 1], dtype=np.uint32)
    out = roundtrip(arr)
    assert out.dtype == np.uint32  # type: ignore[union-attr]
    np.testing.assert_array_equal(out, arr)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "scalar",
    [
        np.uint32(2**32 - 1),
        np.int64(-5),
        np.float32(1.5),
        np.float64(math.nan),
        np.bool_(True),
        np.uint64(2**64 - 1),
    ],
)
def test_numpy_scalars_round_trip_with_type(scalar: np.generic) -> None:
    out = roundtrip({"s": scalar})["s"]  # type: ignore[index]
    assert type(out) is type(scalar)
    if isinstance(scalar, np.floating) and np.isnan(scalar):
        assert np.isnan(out)
    else:
        assert out == scalar


def test_torch_dtypes_and_devices_round_trip() -> None:
    tree = {
        "dt": [torch.float32, torch.bfloat16, torch.int64, torch.bool],
        "dev": [torch.device("cpu"), torch.device("cuda:1")],
    }
    assert roundtrip(tree) == tree


def test_torch_size_comes_back_as_tuple() -> None:
    assert roundtrip(torch.Size([2, 3])) == (2, 3)


class Opaque:
    pass


@pytest.mark.parametrize(
    ("tree", "path"),
    [
        ({"model": {"config": Opaque()}}, "model/config"),
        ({"sched": {"lr_lambdas": [lambda s: s]}}, "sched/lr_lambdas/0"),
        ({"x": {"arr": np.array([object(), 1], dtype=object)}}, "x/arr"),
        ({"x": {"dates": np.array(["2020-01-01"], dtype="datetime64[D]")}}, "x/dates"),
    ],
)
def test_unencodable_leaf_raises_encode_error_naming_its_path(tree: object, path: str) -> None:
    with pytest.raises(errors.EncodeError) as info:
        treelib.encode(tree)
    assert info.value.key == path
    assert repr(path) in str(info.value)


def test_encode_error_for_object_names_type_and_hint() -> None:
    with pytest.raises(errors.EncodeError, match="Opaque.*Stateful"):
        treelib.encode({"o": Opaque()})


def test_reference_cycle_is_an_encode_error_not_a_recursion_error() -> None:
    a: list[object] = []
    a.append(a)
    with pytest.raises(errors.EncodeError, match="deeper"):
        treelib.encode(a)


def test_decode_rejects_unknown_tag_and_missing_tensor() -> None:
    with pytest.raises(errors.FormatError, match="unknown tag"):
        treelib.decode({"$future": 1}, {})
    with pytest.raises(errors.FormatError, match="not stored"):
        treelib.decode({"$tensor": "w"}, {})


def test_decode_rejects_malformed_tags() -> None:
    for node in (
        {"$int": "abc"},
        {"$bytes": "!!!"},
        {"$np": ["<f4"]},
        {"$dtype": "Tensor"},
        {"$float": "x"},
    ):
        with pytest.raises(errors.FormatError):
            treelib.decode(node, {})


def test_decode_refuses_absurdly_deep_skeleton() -> None:
    node: object = 1
    for _ in range(5000):
        node = [node]
    with pytest.raises(errors.FormatError, match="deeper"):
        treelib.decode(node, {})
