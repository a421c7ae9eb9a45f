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


# ---- exact container types (issue 9, item 11) ---------------------------------------------
def test_dict_with_int_or_tuple_keys_comes_back_as_a_plain_dict() -> None:
    tree = {"by_int": {0: "a", 1: "b"}, "by_tuple": {(1, 2): 3, (4,): 5}, "mixed": {"s": 1, 2: 2}}
    out = roundtrip(tree)
    assert out == tree
    for name in tree:
        assert type(out[name]) is dict, name  # type: ignore[index]
    assert type(next(iter(out["by_tuple"]))) is tuple  # type: ignore[index]


def test_ordered_dict_with_non_str_keys_comes_back_as_ordered_dict_in_order() -> None:
    from collections import OrderedDict

    od = OrderedDict([(3, "c"), (1, "a"), ((2, "x"), "b")])
    out = roundtrip({"od": od})["od"]  # type: ignore[index]
    assert type(out) is OrderedDict and list(out.items()) == list(od.items())


def test_ordered_dict_with_str_keys_keeps_the_v1_layout_and_comes_back_as_dict() -> None:
    from collections import OrderedDict

    od = OrderedDict([("b", 1), ("a", 2)])
    skeleton, _ = treelib.encode({"m": od})
    assert skeleton == {"m": {"b": 1, "a": 2}}  # a module state_dict stays a readable JSON object
    out = treelib.decode(skeleton, {})["m"]
    assert type(out) is dict and list(out) == ["b", "a"]


@pytest.mark.parametrize(
    "value",
    [
        [1, 2.0, True, None, "s", b"s"],
        (1, 2.0, False, None, "s", b"s"),
        {"l": [], "t": (), "d": {}, "s": set(), "f": frozenset(), "b": b"", "e": ""},
        [[], [[]], ((),), {"": {}}, [{}]],
        {"n": [0, 0.0, -0.0, 1, 1.0, True, False]},
        {"big": [2**53, 2**53 + 1, -(2**53) - 1, 2**100]},
    ],
)
def test_scalar_and_container_types_round_trip_exactly(value: object) -> None:
    out = roundtrip(value)

    def same(a: object, b: object) -> None:
        assert type(a) is type(b), (a, b)
        if isinstance(a, dict):
            assert list(a) == list(b)  # type: ignore[arg-type]
            for k in a:
                same(a[k], b[k])  # type: ignore[index]
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b)  # type: ignore[arg-type]
            for x, y in zip(a, b, strict=True):  # type: ignore[call-overload]
                same(x, y)
        elif isinstance(a, float):
            assert math.copysign(1.0, a) == math.copysign(1.0, b)  # type: ignore[arg-type]
            assert a == b
        else:
            assert a == b

    same(value, out)


def test_frozenset_and_torch_size_round_trip_with_their_types() -> None:
    out = roundtrip({"f": frozenset({1, 2}), "s": set(), "z": torch.Size([2, 0, 3])})
    assert type(out["f"]) is frozenset and out["f"] == {1, 2}  # type: ignore[index]
    assert type(out["s"]) is set  # type: ignore[index]
    assert type(out["z"]) is torch.Size and out["z"] == torch.Size([2, 0, 3])  # type: ignore[index]


def test_namedtuple_is_refused_with_a_hint_naming_its_path() -> None:
    from collections import namedtuple

    Point = namedtuple("Point", "x y")
    with pytest.raises(errors.EncodeError, match=r"namedtuple|_asdict") as info:
        treelib.encode({"cfg": {"p": Point(1, 2)}})
    assert info.value.key == "cfg/p"


@pytest.mark.parametrize("make", ["intenum", "strenum", "np_str", "defaultdict", "list_sub", "bytearray"])
def test_subclasses_that_would_come_back_as_their_base_type_are_refused(make: str) -> None:
    import collections
    import enum

    class Color(enum.IntEnum):
        RED = 1

    class Mode(str, enum.Enum):
        TRAIN = "train"

    class MyList(list):  # type: ignore[type-arg]
        pass

    value = {
        "intenum": Color.RED,
        "strenum": Mode.TRAIN,
        "np_str": np.str_("x"),
        "defaultdict": collections.defaultdict(int, {"a": 1}),
        "list_sub": MyList([1]),
        "bytearray": bytearray(b"x"),
    }[make]
    with pytest.raises(errors.EncodeError) as info:
        treelib.encode({"x": value})
    assert info.value.key == "x"


def test_tensor_inside_a_dict_key_is_an_encode_error() -> None:
    with pytest.raises(errors.EncodeError, match="key holding a tensor") as info:
        treelib.encode({"d": {(1, torch.zeros(1)): "x"}})
    assert info.value.key == "d"


def test_lone_surrogate_string_is_an_encode_error_not_a_crash_at_write_time() -> None:
    with pytest.raises(errors.EncodeError) as info:
        treelib.encode({"s": "\ud800"})
    assert info.value.key == "s"


def test_v1_skeletons_still_decode() -> None:
    """What the first v1 release wrote: $dict for every non-str-keyed mapping, $set for
    frozensets, $tuple for torch.Size."""
    v1 = {
        "state": {"$dict": [[0, {"step": 1}], [1, {"step": 2}]]},
        "keys": {"$dict": [[{"$tuple": [1, 2]}, "t"], ["$x", 1], [None, 2], [2.5, 3], [False, 4]]},
        "fs": {"$set": ["a"]},
        "size": {"$tuple": [2, 3]},
    }
    out = treelib.decode(v1, {})
    assert out == {
        "state": {0: {"step": 1}, 1: {"step": 2}},
        "keys": {(1, 2): "t", "$x": 1, None: 2, 2.5: 3, False: 4},
        "fs": {"a"},
        "size": (2, 3),
    }
    assert type(out["state"]) is dict


# ---- malformed skeletons: FormatError with .path and .key, nothing else (issue 9, item 17) ----
MALFORMED: list[tuple[object, str]] = [
    ({"a": {"$future": 1}}, "a"),
    ({"a": {"$tensor": "missing"}}, "a"),
    ({"a": {"$tensor": 5}}, "a"),
    ({"a": {"$ndarray": ["x"]}}, "a"),
    ({"a": [0, {"$tuple": 5}]}, "a/1"),
    ({"a": {"$tuple": {"x": 1}}}, "a"),
    ({"a": {"$set": [[1]]}}, "a"),
    ({"a": {"$set": [{"$dict": []}]}}, "a"),
    ({"a": {"$frozenset": "ab"}}, "a"),
    ({"a": {"$dict": {"k": 1}}}, "a"),
    ({"a": {"$dict": [[1]]}}, "a"),
    ({"a": {"$dict": [[1, 2, 3]]}}, "a"),
    ({"a": {"$dict": [5]}}, "a"),
    ({"a": {"$dict": [[[1, 2], 3]]}}, "a"),
    ({"a": {"$dict": [[{"$set": [1]}, 3]]}}, "a"),
    ({"a": {"$dict": [[1, 2], [1, 3]]}}, "a"),
    ({"a": {"$odict": [[{"$bytes": "AA=="}, 1]]}}, "a"),
    ({"a": {"$float": "1.5"}}, "a"),
    ({"a": {"$float": 1.5}}, "a"),
    ({"a": {"$int": "12a"}}, "a"),
    ({"a": {"$int": 12}}, "a"),
    ({"a": {"$int": "1" * 5000}}, "a"),
    ({"a": {"$bytes": "!!!"}}, "a"),
    ({"a": {"$bytes": 7}}, "a"),
    ({"a": {"$np": ["<f4"]}}, "a"),
    ({"a": {"$np": ["O", 1]}}, "a"),
    ({"a": {"$np": ["<U4", "x"]}}, "a"),
    ({"a": {"$np": ["<u4", -1]}}, "a"),
    ({"a": {"$np": ["<i1", 300]}}, "a"),
    ({"a": {"$np": ["<f4", 1e300]}}, "a"),
    ({"a": {"$np": ["<f4", "x"]}}, "a"),
    ({"a": {"$np": [5, 1]}}, "a"),
    ({"a": {"$np": "x"}}, "a"),
    ({"a": {"$dtype": "Tensor"}}, "a"),
    ({"a": {"$dtype": "_dynamo"}}, "a"),
    ({"a": {"$dtype": None}}, "a"),
    ({"a": {"$device": "warp-drive"}}, "a"),
    ({"a": {"$device": 3}}, "a"),
    ({"a": {"$size": [-1]}}, "a"),
    ({"a": {"$size": ["x"]}}, "a"),
    ({"a": {"b": {"c": float("nan")}}}, "a/b/c"),
    ({"a": {1: 2}}, "a"),
    ({"a": object()}, "a"),
]


@pytest.mark.parametrize(("skeleton", "where"), MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_skeleton_is_format_error_with_path_and_tree_key(skeleton: object, where: str) -> None:
    with pytest.raises(errors.FormatError) as info:
        treelib.decode(skeleton, {"w": torch.zeros(1)}, path="/ckpt/manifest.json")
    assert info.value.path == "/ckpt/manifest.json"
    assert info.value.key == where
    assert "/ckpt/manifest.json" in str(info.value)


def test_ndarray_of_a_dtype_numpy_lacks_is_format_error() -> None:
    with pytest.raises(errors.FormatError) as info:
        treelib.decode({"x": {"$ndarray": "x"}}, {"x": torch.zeros(2, dtype=torch.bfloat16)}, path="m")
    assert info.value.key == "x" and info.value.path == "m"


def test_check_validates_against_tensor_keys_without_tensors() -> None:
    treelib.check({"w": {"$tensor": "w"}, "a": {"$ndarray": "a"}}, {"w": "bfloat16", "a": "uint32"}, path="m")
    with pytest.raises(errors.FormatError) as info:
        treelib.check({"w": {"$tensor": "v"}}, {"w": "float32"}, path="m")
    assert info.value.key == "w" and info.value.path == "m"
    with pytest.raises(errors.FormatError, match="numpy") as info:
        treelib.check({"x": [{"$ndarray": "a"}]}, {"a": "bfloat16"}, path="m")
    assert info.value.key == "x/0"


def test_decode_from_a_deep_caller_stack_is_format_error_not_recursion_error() -> None:
    import sys

    node: object = 1
    for _ in range(150):
        node = {"$tuple": [node]}

    def deep(n: int) -> object:
        return deep(n - 1) if n else treelib.decode(node, {}, path="m")

    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(400)
        with pytest.raises(errors.FormatError, match="too deeply"):
            deep(100)
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize(
    "node",
    [
        {"$dtype": name}
        for name in ("float32", "bfloat16", "float8_e4m3fn", "float", "qint8", "quint4x2", "bits8",
                     "Tensor", "__class__", "float99", "", "cuda")
    ]
    + [
        {"$device": name}
        for name in ("cpu", "cuda", "cuda:0", "cuda:127", "cuda:128", "cuda:01", "CUDA", "xpu:3",
                     "hpu", "meta", "mps:0", "cpu:-1", "cuda:", "nonsense")
    ]
    + [{"$size": v} for v in ([], [2, 3], [-1], [2.0], "2", [True])],
)  # fmt: skip
def test_check_accepts_exactly_what_decode_accepts_for_torch_objects(node: dict[str, object]) -> None:
    """check() validates $dtype/$device/$size without building torch objects where it can: it
    must never pass a skeleton that decode refuses, nor refuse one that decode builds."""
    try:
        treelib.decode({"x": node}, {}, path="m")
    except errors.FormatError:
        with pytest.raises(errors.FormatError) as info:
            treelib.check({"x": node}, {}, path="m")
        assert info.value.key == "x" and info.value.path == "m"
    else:
        treelib.check({"x": node}, {}, path="m")


_LEAVES = [
    {"$dtype": "float32"}, {"$dtype": "float"}, "float32", {"$device": "cpu"}, "cpu", {"$device": "cuda:1"},
    {"$size": [1, 2]}, {"$tuple": [1, 2]}, {"$size": []}, {"$tuple": []}, {"$tensor": "t"}, {"$tensor": "u"},
    {"$ndarray": "t"},
]  # fmt: skip
_CONTEXTS = {
    "key": lambda a, b: {"$dict": [[a, 1]]},
    "tuple-keys": lambda a, b: {"$dict": [[{"$tuple": [a]}, 1], [{"$tuple": [b]}, 2]]},
    "set": lambda a, b: {"$set": [a, b]},
    "frozenset-in-set": lambda a, b: {"$set": [{"$frozenset": [a]}, {"$frozenset": [b]}]},
}


@pytest.mark.parametrize("context", list(_CONTEXTS))
def test_check_refuses_exactly_what_decode_refuses_for_torch_objects_as_keys_and_members(context: str) -> None:
    """A torch object in a dict key, a tuple key or a set follows torch's own equality and key
    rules in check(): torch.float32 is not "float32", float is float32, torch.Size([1, 2]) equals
    (1, 2), a tensor is a key only inside a tuple and an array never is. Every pair of leaves in
    every context: check() and decode() refuse the same skeletons."""
    stored = {"t": torch.zeros(2), "u": torch.zeros(2)}
    dtypes = {k: "float32" for k in stored}
    wrong = []
    for a in _LEAVES:
        for b in _LEAVES:
            node = {"x": _CONTEXTS[context](a, b)}
            try:
                treelib.decode(node, stored)
                decoded = True
            except errors.FormatError:
                decoded = False
            try:
                treelib.check(node, dtypes)
                checked = True
            except errors.FormatError:
                checked = False
            if decoded != checked:
                wrong.append((a, b, decoded, checked))
    assert not wrong
