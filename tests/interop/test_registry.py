"""The format registry: read-only to callers, extended only through register_format (fsspec's
``register_implementation`` style), and consulted by detect/open."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import savegame
from savegame import errors
from savegame.interop import detect

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "foreign"


@pytest.fixture(autouse=True)
def _registry_restored() -> Iterator[None]:
    """Each test starts from, and leaves, the built-in registry."""
    registry, options = dict(detect._REGISTRY), dict(detect._OPTIONS)
    yield
    detect._REGISTRY.clear()
    detect._REGISTRY.update(registry)
    detect._OPTIONS.clear()
    detect._OPTIONS.update(options)


@pytest.fixture()
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A third-party reader module on sys.path: reads a text file of ``name=value`` lines."""
    name = f"sg_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            from savegame import errors
            from savegame.interop import base

            OPENED = []


            class KVReader(base.Reader):
                def __init__(self, path, scale=1.0):
                    self.path = path
                    self.format = "kv"
                    self.scale = scale
                    with open(path) as f:
                        pairs = [line.split("=") for line in f.read().split()]
                    self._data = {k: float(v) * scale for k, v in pairs}

                def keys(self):
                    self._check_open()
                    return list(self._data)

                def info(self, name):
                    self._check_open()
                    if name not in self._data:
                        raise errors.CheckpointNotFoundError(name, path=self.path, key=name)
                    return base.TensorInfo(name, "float64", (), 8)

                def read(self, name):
                    self.info(name)
                    return np.array(self._data[name])

                def tree(self):
                    self._check_open()
                    return {k: base.TensorRef(k) for k in self._data}

                def metadata(self):
                    self._check_open()
                    return {"scale": self.scale}

                def verify(self):
                    self._check_open()
                    return []


            def open_kv(path, *, scale=1.0):
                OPENED.append(path)
                return KVReader(path, scale)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_formats_is_read_only_and_lists_the_built_in_readers() -> None:
    assert set(detect.FORMATS) == {
        "torch",
        "safetensors",
        "numpy",
        "tensorflow",
        "keras-h5",
        "keras3",
        "darknet",
        "torch-export",
    }
    with pytest.raises(TypeError):
        detect.FORMATS["x"] = ("m", "f")  # type: ignore[index]
    with pytest.raises(TypeError):
        del detect.FORMATS["torch"]  # type: ignore[attr-defined]
    assert not hasattr(detect.FORMATS, "pop") and not hasattr(detect.FORMATS, "update")


def test_register_format_never_imports_the_module() -> None:
    savegame.register_format("lazyfmt", "sg_no_such_module.reader", "open_x")
    assert detect.FORMATS["lazyfmt"] == ("sg_no_such_module.reader", "open_x")
    assert "sg_no_such_module" not in sys.modules
    assert "sg_no_such_module.reader" not in sys.modules


def test_registered_format_is_opened_by_name(tmp_path: Path, plugin: str) -> None:
    p = tmp_path / "weights.kv"
    p.write_text("a=1.5 b=2")
    savegame.register_format("kv", plugin, "open_kv", options=("scale",))
    assert plugin not in sys.modules  # imported on first open, not at registration
    with savegame.open(p, format="kv", scale=2.0, cfg="ignored.cfg", listing=True) as r:
        assert isinstance(r, savegame.Reader)
        assert r.format == "kv" and r.keys() == ["a", "b"]
        assert float(r.read("a")) == 3.0
        assert r.metadata() == {"scale": 2.0}
    assert sys.modules[plugin].OPENED == [str(p)]
    with pytest.raises(savegame.ReaderClosedError):
        r.keys()


def test_options_of_a_registered_format_are_dropped_for_the_others(
    tmp_path: Path, plugin: str
) -> None:
    savegame.register_format("kv", plugin, "open_kv", options=("scale",))
    p = tmp_path / "a.npy"
    np.save(p, np.arange(3))
    with savegame.open(p, scale=2.0) as r:  # numpy's opener takes no scale=
        assert r.format == "numpy"


def test_detection_names_only_magic_it_knows_and_lists_registered_formats(
    tmp_path: Path, plugin: str
) -> None:
    savegame.register_format("kv", plugin, "open_kv")
    p = tmp_path / "weights.kv"
    p.write_text("a=1 b=2 c=3 d=4")
    with pytest.raises(
        errors.UnsupportedFormatError, match=r"registered \(open with format=...\): kv"
    ) as ei:
        savegame.open(p)
    assert ei.value.path == str(p)


def test_format_skips_detection_for_built_in_formats(tmp_path: Path) -> None:
    p = tmp_path / "a.npy"
    np.save(p, np.arange(3))
    with savegame.open(p, format="numpy") as r:
        assert r.format == "numpy" and r.keys() == ["array"]
    # The named reader decides: a numpy file is no safetensors file.
    with pytest.raises(errors.FormatError):
        savegame.open(p, format="safetensors")
    with savegame.open(GOLDEN / "tensorflow" / "tf1", format="tensorflow") as r:
        assert r.format == "tensorflow"


def test_format_savegame_opens_a_checkpoint_folder(tmp_path: Path) -> None:
    d = Path(__file__).resolve().parent.parent / "golden" / "savegame_v1" / "step-000000000007"
    with savegame.open(d, format="savegame") as r:
        assert r.format == "savegame" and r.keys()
    with pytest.raises(errors.UnsupportedFormatError, match="savegame.open"):
        detect.open(d, format="savegame")


def test_unknown_format_name_is_refused_with_the_registered_names(tmp_path: Path) -> None:
    p = tmp_path / "a.npy"
    np.save(p, np.arange(3))
    with pytest.raises(
        errors.UnsupportedFormatError, match="no reader is registered for format 'nope'"
    ) as ei:
        savegame.open(p, format="nope")
    assert "safetensors" in str(ei.value) and ei.value.path == str(p)
    with pytest.raises(errors.UnsupportedFormatError, match="TorchScript"):
        savegame.open(p, format="torchscript")


def test_duplicate_name_needs_clobber(tmp_path: Path, plugin: str) -> None:
    savegame.register_format("kv", plugin, "open_kv")
    with pytest.raises(ValueError, match="already registered.*clobber=True"):
        savegame.register_format("kv", "other.module", "open_other")
    assert detect.FORMATS["kv"] == (plugin, "open_kv")
    with pytest.raises(ValueError, match="already registered"):
        savegame.register_format("numpy", plugin, "open_kv")
    assert detect.FORMATS["numpy"] == ("savegame.interop.numpy", "open_numpy")


def test_clobber_replaces_a_built_in_reader(tmp_path: Path, plugin: str) -> None:
    savegame.register_format("numpy", plugin, "open_kv", clobber=True)
    p = tmp_path / "weights.kv"
    p.write_text("a=1")
    with savegame.open(p, format="numpy") as r:
        assert r.format == "kv"  # the replacement opened it


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        (("savegame", "m", "f"), {}, ValueError, "reserved"),
        (("torchscript", "m", "f"), {}, ValueError, "reserved"),
        (("", "m", "f"), {}, ValueError, "not valid"),
        (("Upper", "m", "f"), {}, ValueError, "not valid"),
        (("has space", "m", "f"), {}, ValueError, "not valid"),
        (("1abc", "m", "f"), {}, ValueError, "not valid"),
        (("x" * 65, "m", "f"), {}, ValueError, "not valid"),
        (("ok", "not a module", "f"), {}, ValueError, "module"),
        (("ok", "pkg..mod", "f"), {}, ValueError, "module"),
        (("ok", "pkg.mod", "open-x"), {}, ValueError, "opener"),
        (("ok", "pkg.mod", "f"), {"options": ("cfg", "bad-name")}, ValueError, "options"),
        ((3, "m", "f"), {}, TypeError, "name must be a str"),
        (("ok", None, "f"), {}, TypeError, "module must be a str"),
        (("ok", "m", "f"), {"options": (1,)}, TypeError, "options must be str"),
    ],
)
def test_bad_registrations_are_refused_and_change_nothing(
    args: tuple[object, ...], kwargs: dict[str, object], exc: type[Exception], match: str
) -> None:
    before = dict(detect.FORMATS)
    with pytest.raises(exc, match=match):
        savegame.register_format(*args, **kwargs)  # type: ignore[arg-type]
    assert dict(detect.FORMATS) == before


def test_a_single_option_string_is_one_option(tmp_path: Path, plugin: str) -> None:
    savegame.register_format("kv", plugin, "open_kv", options="scale")
    assert detect._OPTIONS["kv"] == ("scale",)


def test_a_registered_module_that_is_missing_is_unsupported(tmp_path: Path) -> None:
    savegame.register_format("ghost", "sg_ghost_reader_module", "open_ghost")
    p = tmp_path / "x.ghost"
    p.write_text("anything")
    with pytest.raises(errors.UnsupportedFormatError, match="no ghost reader"):
        savegame.open(p, format="ghost")


def test_a_registered_module_without_its_opener_is_unsupported(tmp_path: Path, plugin: str) -> None:
    savegame.register_format("kv", plugin, "open_missing")
    p = tmp_path / "weights.kv"
    p.write_text("a=1")
    with pytest.raises(errors.UnsupportedFormatError, match="has no open_missing"):
        savegame.open(p, format="kv")
