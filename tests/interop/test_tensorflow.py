"""savegame.interop.tensorflow against checkpoints written by the real TensorFlow 2.21.

The golden files in tests/golden/foreign/tensorflow/ come from make_fixtures.py; expected.json +
expected.npz hold what ``tf.train.load_checkpoint`` itself read. No TensorFlow needed here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from savegame import errors
from savegame.interop import base, tensorflow

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "foreign" / "tensorflow"
EXPECTED: dict[str, Any] = json.loads((GOLDEN / "expected.json").read_text())
FIXTURES = sorted(EXPECTED)


def load_writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tf_bundle_writer", GOLDEN / "bundle_writer.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bw = load_writer()


@pytest.fixture(scope="module")
def npz() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "expected.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _as_numpy_bits(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@pytest.mark.parametrize("fixture", FIXTURES)
def test_every_tensor_equals_tensorflows_reading_bitwise(
    fixture: str, npz: dict[str, np.ndarray]
) -> None:
    exp = EXPECTED[fixture]
    with tensorflow.open_tensorflow(GOLDEN / exp["prefix"]) as r:
        skipped = r.metadata()["skipped"]
        assert set(r.keys()) | set(skipped) == set(exp["tensors"])
        assert set(r.keys()).isdisjoint(skipped)
        for key, want in exp["tensors"].items():
            if key in skipped:
                continue
            info = r.info(key)
            assert list(info.shape) == want["shape"], key
            if want["dtype"] == "string":
                assert info.dtype == "string"
                strings = [bytes.fromhex(h) for h in want["strings_hex"]]
                got = r.read_strings(key)
                assert (got if want["shape"] else [got]) == strings, key
                arr = r.read(key)
                assert isinstance(arr, np.ndarray) and arr.dtype.kind == "S"
                assert arr.shape == tuple(want["shape"])
                assert arr.reshape(-1).tolist() == [s.rstrip(b"\0") for s in strings]
                continue
            t = r.read(key)
            assert isinstance(t, torch.Tensor), key
            assert str(t.dtype) == f"torch.{want['dtype']}", key
            ref = npz[want["npz"]]
            got = _as_numpy_bits(t)
            assert got.shape == ref.shape, key
            assert got.dtype == ref.dtype, key
            assert got.tobytes() == ref.tobytes(), key


def test_partitioned_variables_are_reassembled() -> None:
    # TF1 fixed_size_partitioner along axis 0 and axis 1; values are checked bitwise against
    # TF's own reading by the test above.
    with tensorflow.open_tensorflow(GOLDEN / "tf1") as r:
        assert r.metadata()["skipped"] == {}
        assert {"part", "part/Adam", "part/Adam_1", "part_cols"} <= set(r.keys())
        assert r.info("part_cols") == base.TensorInfo("part_cols", "float32", (2, 5), 40)
        assert all("\x00" not in k and not k.startswith("b'") for k in r.keys())
        assert r.read("part_cols").is_contiguous()


def test_shard_size_policy_checkpoint_spans_four_shards() -> None:
    # TF >= 2.16 MaxShardSizePolicy: variables are sliced across shards.
    with tensorflow.open_tensorflow(GOLDEN / "sharded" / "ckpt") as r:
        assert r.metadata()["num_shards"] == 4
        a = r.read("m/a/.ATTRIBUTES/VARIABLE_VALUE")
        assert torch.equal(a, torch.arange(300, dtype=torch.float32) / 7)
        c = r.read("m/c/.ATTRIBUTES/VARIABLE_VALUE")
        assert torch.equal(c, torch.arange(100, dtype=torch.float64).reshape(10, 10))
        assert r.read_strings("m/s/.ATTRIBUTES/VARIABLE_VALUE") == [b"x" * 50, b"yy"]
        assert r.object_paths()["m/a/.ATTRIBUTES/VARIABLE_VALUE"] == "m/a"


@pytest.mark.parametrize("fixture", FIXTURES)
def test_verify_is_clean_on_real_checkpoints(fixture: str) -> None:
    with tensorflow.open_tensorflow(GOLDEN / EXPECTED[fixture]["prefix"]) as r:
        assert r.verify() == []


@pytest.mark.parametrize("fixture", FIXTURES)
def test_every_way_of_naming_the_checkpoint_opens_the_same_one(fixture: str) -> None:
    prefix = GOLDEN / EXPECTED[fixture]["prefix"]
    folder = prefix.parent
    shards = sorted(folder.glob(f"{prefix.name}.data-*"))
    ways = [prefix, Path(f"{prefix}.index"), *shards, str(prefix)]
    if (folder / "checkpoint").exists():
        ways += [folder, folder / "checkpoint"]
    keys = None
    for way in ways:
        with tensorflow.open_tensorflow(way) as r:
            assert r.format == "tensorflow"
            assert Path(r.path).resolve() == prefix.resolve()
            keys = keys or r.keys()
            assert r.keys() == keys


def test_pointer_file_state_is_in_metadata() -> None:
    with tensorflow.open_tensorflow(GOLDEN / "keras3") as r:
        state = r.metadata()["checkpoint_state"]
    assert state == {"model_checkpoint_path": "ckpt-1", "all_model_checkpoint_paths": ["ckpt-1"]}


def test_pointer_file_picks_the_named_checkpoint(tmp_path: Path) -> None:
    bw.write_bundle(tmp_path / "ckpt-1", {"a": np.arange(3, dtype=np.int32)})
    bw.write_bundle(tmp_path / "ckpt-2", {"b": np.arange(3, dtype=np.int32)})
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-1"\n'
        'all_model_checkpoint_paths: "ckpt-2"\n'
    )
    with tensorflow.open_tensorflow(tmp_path) as r:
        assert r.keys() == ["a"]
    # An absolute path inside the folder (TF1 default) is fine too.
    (tmp_path / "checkpoint").write_text(f'model_checkpoint_path: "{tmp_path / "ckpt-2"}"\n')
    with tensorflow.open_tensorflow(tmp_path) as r:
        assert r.keys() == ["b"]


def test_tf2_keys_resolve_through_the_object_graph_keras2() -> None:
    with tensorflow.open_tensorflow(GOLDEN / "tfkeras") as r:
        paths = r.object_paths()
        meta = r.metadata()
        tree = r.tree()
    k = "model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert paths[k] == "model/layer_with_weights-0/kernel"
    assert meta["variable_names"][k] == "conv/kernel"
    slot = (
        "model/layer_with_weights-2/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"
    )
    assert paths[slot] == "model/layer_with_weights-2/kernel/.OPTIMIZER_SLOT/optimizer/m"
    assert meta["variable_names"][slot] == "Adam/fc/kernel/m"
    kernel = tree["model"]["layer_with_weights-0"]["kernel"]
    assert kernel["."] == base.TensorRef(k)
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in paths
    assert meta["layout"] == "tf2-object-graph"
    json.dumps(meta)  # JSON-compatible


def test_tf2_keras3_model_weights_are_named_by_the_model_not_the_optimizer() -> None:
    # Keras 3 stores model weights under optimizer/_trainable_variables/N (FORMATS.md §3.4).
    with tensorflow.open_tensorflow(GOLDEN / "keras3") as r:
        paths = r.object_paths()
        names = r.metadata()["variable_names"]
        tree = r.tree()
        keys = r.keys()  # inside the block: a closed reader refuses keys() too
    k = "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"
    assert names[k] == "sequential/conv/kernel"
    assert paths[k].startswith("model/") and paths[k].endswith("kernel")
    node: Any = tree
    for part in paths[k].split("/"):
        node = node[part]
    assert node == base.TensorRef(k)
    # Every key except the graph itself got a path, and the paths are unique.
    assert set(paths) == set(keys) - {"_CHECKPOINTABLE_OBJECT_GRAPH"}
    assert len(set(paths.values())) == len(paths)


def test_tf1_tree_nests_by_name_and_keeps_leaf_and_slots() -> None:
    with tensorflow.open_tensorflow(GOLDEN / "tf1") as r:
        tree = r.tree()
        meta = r.metadata()
    assert meta["layout"] == "tf1-names" and meta["object_paths"] == {}
    kernel = tree["dense"]["kernel"]
    assert kernel["."] == base.TensorRef("dense/kernel")
    assert kernel["Adam"] == base.TensorRef("dense/kernel/Adam")
    assert kernel["Adam_1"] == base.TensorRef("dense/kernel/Adam_1")
    assert tree["global_step"] == base.TensorRef("global_step")


def test_tf1_adam_slots_and_global_step(npz: dict[str, np.ndarray]) -> None:
    with tensorflow.open_tensorflow(GOLDEN / "tf1") as r:
        step = r.read("global_step")
        assert step.dtype == torch.int64 and step.shape == () and int(step) == 3
        assert r.read("dense/kernel/Adam").shape == (3, 2)
        assert r.read_strings("name_str") == b"tf1 string \x00\xff"


def test_string_tensors_lossless_and_S_array() -> None:
    with tensorflow.open_tensorflow(GOLDEN / "keras3") as r:
        key = "extra/strings/.ATTRIBUTES/VARIABLE_VALUE"
        assert r.read_strings(key) == [b"alpha", b"", b"\x00bin\xff", "ünï".encode()]
        arr = r.read(key)
        assert arr.dtype == np.dtype("S5") and arr.dtype != object
        with pytest.raises(errors.FormatError):
            r.read_strings("extra/count/.ATTRIBUTES/VARIABLE_VALUE")


def test_read_returns_independent_writable_tensors() -> None:
    with tensorflow.open_tensorflow(GOLDEN / "tf1") as r:
        a = r.read("dense/kernel")
        a.add_(1)
        assert not torch.equal(a, r.read("dense/kernel"))


def test_info_and_missing_key_and_closed_reader() -> None:
    r = tensorflow.open_tensorflow(GOLDEN / "keras3")
    info = r.info("extra/half/.ATTRIBUTES/VARIABLE_VALUE")
    assert info == base.TensorInfo("extra/half/.ATTRIBUTES/VARIABLE_VALUE", "float16", (2, 2), 8)
    with pytest.raises(errors.CheckpointNotFoundError) as ei:
        r.read("nope")
    assert ei.value.key == "nope" and ei.value.path == r.path
    r.close()
    with pytest.raises(errors.ReaderClosedError):
        r.keys() and r.read("extra/half/.ATTRIBUTES/VARIABLE_VALUE")


@pytest.mark.parametrize("big_endian", [False, True])
def test_synthetic_bundle_all_dtypes_and_byte_orders(tmp_path: Path, big_endian: bool) -> None:
    rng = np.random.default_rng(0)
    tensors: dict[str, Any] = {
        "f16": rng.normal(size=(2, 3)).astype(np.float16),
        "f32": rng.normal(size=(4,)).astype(np.float32),
        "f64": rng.normal(size=(2, 2)).astype(np.float64),
        "i8": np.array([-128, 127], np.int8),
        "i16": np.array([-3, 300], np.int16),
        "i32": np.array([[1, -2]], np.int32),
        "i64": np.array(-(2**40), np.int64),
        "u8": np.array([0, 255], np.uint8),
        "u16": np.array([65535], np.uint16),
        "u32": np.array([2**32 - 1], np.uint32),
        "u64": np.array([2**64 - 1], np.uint64),
        "c64": np.array([1 + 2j, -3j], np.complex64),
        "c128": np.array([1e300 + 1j], np.complex128),
        "b": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "s": [b"x", b"", b"long" * 100],
    }
    bw.write_bundle(tmp_path / "ckpt", tensors, big_endian=big_endian)
    with tensorflow.open_tensorflow(tmp_path / "ckpt") as r:
        assert r.metadata()["byte_order"] == ("big" if big_endian else "little")
        assert r.verify() == []
        for name, want in tensors.items():
            if isinstance(want, list):
                assert r.read_strings(name) == want
                continue
            got = r.read(name)
            assert isinstance(got, torch.Tensor)
            np.testing.assert_array_equal(got.numpy(), want)
            assert got.numpy().dtype == want.dtype


def test_multi_block_index_with_many_restarts(tmp_path: Path) -> None:
    tensors = {f"layer{i:03d}/w": np.full((2,), i, np.float32) for i in range(100)}
    bw.write_bundle(tmp_path / "ckpt", tensors, block_items=7)
    raw = (tmp_path / "ckpt.index").read_bytes()
    with tensorflow.open_tensorflow(tmp_path / "ckpt.index") as r:
        assert r.keys() == sorted(tensors)
        for name, want in tensors.items():
            np.testing.assert_array_equal(r.read(name).numpy(), want)
        assert r.verify() == []
    assert len(raw) > 100 * 20  # really several blocks


def test_sniff() -> None:
    assert tensorflow.sniff(GOLDEN / "keras3")
    assert tensorflow.sniff(GOLDEN / "keras3" / "ckpt-1.index")
    assert tensorflow.sniff(GOLDEN / "keras3" / "ckpt-1")
    assert not tensorflow.sniff(GOLDEN / "expected.json")
    assert not tensorflow.sniff(GOLDEN / "does-not-exist")
    tail = (GOLDEN / "tf1" / "model.ckpt-3.index").read_bytes()[-8:]
    assert tensorflow.is_index_tail(tail)
    assert not tensorflow.is_index_tail(b"\0" * 8)


def test_copy_of_checkpoint_elsewhere_still_reads(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN / "tfkeras", tmp_path / "moved")
    with tensorflow.open_tensorflow(tmp_path / "moved") as r:
        assert r.verify() == []
        assert len(r.keys()) == len(EXPECTED["tfkeras"]["tensors"])
