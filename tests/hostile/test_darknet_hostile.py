"""Hostile darknet cfgs and weights files: every one is a typed savegame error with ``.path``."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from savegame import errors
from savegame.adapters import darknet_torch
from savegame.interop import darknet, detect

NET = "[net]\nwidth=16\nheight=16\nchannels=3\n"
CONV = "[convolutional]\nfilters=4\nsize=3\npad=1\nactivation=leaky\n"


def _weights(tmp_path: Path, nfloats: int, name: str = "w.weights") -> Path:
    path = tmp_path / name
    path.write_bytes(struct.pack("<iiiQ", 0, 2, 5, 0) + b"\0" * (4 * nfloats))
    return path


def _open(tmp_path: Path, cfg_text: str, nfloats: int = 0, **kw: bool) -> darknet.DarknetReader:
    cfg = tmp_path / "net.cfg"
    cfg.write_text(cfg_text)
    return darknet.open_darknet(_weights(tmp_path, nfloats), cfg=cfg, partial=True, **kw)


def _expect(
    tmp_path: Path,
    cfg_text: str,
    exc: type[errors.CheckpointError] = errors.FormatError,
    match: str | None = None,
) -> errors.CheckpointError:
    with pytest.raises(exc, match=match) as info:
        _open(tmp_path, cfg_text)
    assert info.value.path == str(tmp_path / "net.cfg")
    return info.value


def test_weights_file_shorter_than_header(tmp_path: Path) -> None:
    cfg = tmp_path / "net.cfg"
    cfg.write_text(NET + CONV)
    for size in (0, 5, 12, 19):
        path = tmp_path / f"short{size}.weights"
        path.write_bytes(struct.pack("<iiiQ", 0, 2, 5, 0)[:size])
        with pytest.raises(
            errors.FormatError, match="is empty" if size == 0 else "too short"
        ) as info:
            darknet.open_darknet(path, cfg=cfg)
        assert info.value.path == str(path)
        # The same through detection (the CLI's way in): an empty file says so.
        with pytest.raises(errors.FormatError, match="is empty" if size == 0 else "too short"):
            detect.open(path, cfg=cfg)


def test_weights_file_shorter_than_cfg_is_refused_unless_partial(tmp_path: Path) -> None:
    cfg = tmp_path / "net.cfg"
    cfg.write_text(NET + CONV)
    need = 4 + 4 * 3 * 9
    path = _weights(tmp_path, need - 1)
    with pytest.raises(errors.FormatError, match=r"holds 0 of the 1 layers.*partial=True") as info:
        darknet.open_darknet(path, cfg=cfg)
    assert info.value.path == str(path)
    with darknet.open_darknet(path, cfg=cfg, partial=True) as r:
        assert r.keys() == []
        assert str(r.coverage) == "0 of 1 layers present"
        assert r.verify() and "cut inside" in r.verify()[0]


def test_weights_and_cfg_missing(tmp_path: Path) -> None:
    cfg = tmp_path / "net.cfg"
    cfg.write_text(NET + CONV)
    with pytest.raises(errors.CheckpointNotFoundError) as info:
        darknet.open_darknet(tmp_path / "nope.weights", cfg=cfg)
    assert info.value.path == str(tmp_path / "nope.weights")
    with pytest.raises(errors.CheckpointNotFoundError) as info:
        darknet.open_darknet(_weights(tmp_path, 0), cfg=tmp_path / "nope.cfg")
    assert info.value.path == str(tmp_path / "nope.cfg")


@pytest.mark.parametrize(
    "route",
    ["layers=-5", "layers=1", "layers=7", "layers=-1,-9", "layers=99999999", "layers=", "x=1"],
)
def test_route_index_out_of_range(tmp_path: Path, route: str) -> None:
    _expect(tmp_path, NET + CONV + f"[route]\n{route}\n")


def test_shortcut_index_out_of_range(tmp_path: Path) -> None:
    _expect(tmp_path, NET + CONV + "[shortcut]\nfrom=-3\n", match="not an earlier layer")
    _expect(tmp_path, NET + CONV + "[shortcut]\nfrom=1\n", match="not an earlier layer")


def test_groups_not_dividing_channels(tmp_path: Path) -> None:
    _expect(tmp_path, NET + "[convolutional]\nfilters=4\nsize=1\ngroups=2\n", match="groups=2")
    _expect(tmp_path, NET + CONV + "[route]\nlayers=-1\ngroups=3\n", match="groups=3")
    _expect(tmp_path, NET + "[convolutional]\nfilters=4\ngroups=0\n", match="groups=0")


@pytest.mark.parametrize(
    "layer",
    [
        "[convolutional]\nfilters=1000000000\nsize=3\n",
        "[convolutional]\nfilters=4\nsize=100000\n",
        "[convolutional]\nfilters=-4\n",
        "[convolutional]\nfilters=4\nsize=33\n",  # kernel larger than the padded input
        "[convolutional]\nfilters=4\nstride=0\n",
        "[convolutional]\nfilters=1048576\nsize=1024\npad=1\n",  # 1e6 x 1e6 x 3 floats
        "[connected]\noutput=1048576\n[connected]\noutput=1048576\n",
        "[upsample]\nstride=1024\n[upsample]\nstride=1024\n",
        "[maxpool]\nsize=0\n",
        "[reorg]\nstride=32\n",
        "[convolutional]\nfilters=4\nsize=3.5\n",
        "[convolutional]\nfilters=nan\n",
        "[convolutional]\nfilters=1e400\n",
        "[convolutional]\nbatch_normalize=2\n",
    ],
)
def test_absurd_numbers_are_refused(tmp_path: Path, layer: str) -> None:
    _expect(tmp_path, NET + layer)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "width=3\n",
        "[convolutional]\nfilters=2\n",  # no [net]
        "[net\nwidth=3\n",
        "[]\n",
        NET + "filters\n",
        NET + "=3\n",
        "[net]\nwidth=16\n",  # no height/channels/inputs
        NET,  # no layers
        NET + "[net]\n",
        NET + "\n".join(f"[dropout]\nprobability={i}" for i in range(10_001)),
        NET + "[convolutional]\n" + "".join(f"k{i}=1\n" for i in range(300)),
    ],
)
def test_malformed_cfg(tmp_path: Path, text: str) -> None:
    _expect(tmp_path, text)


def test_unknown_layer_type_is_unsupported(tmp_path: Path) -> None:
    _expect(tmp_path, NET + "[teleport]\n", errors.UnsupportedFormatError)
    _expect(tmp_path, NET + "[gru]\noutput=4\n", errors.UnsupportedFormatError)


def test_huge_or_binary_cfg(tmp_path: Path) -> None:
    cfg = tmp_path / "net.cfg"
    cfg.write_bytes(b"[net]\n" + b"#" * (darknet.MAX_CFG_BYTES + 1))
    with pytest.raises(errors.FormatError) as info:
        darknet.open_darknet(_weights(tmp_path, 0), cfg=cfg)
    assert info.value.path == str(cfg)
    cfg.write_bytes(b"[net]\n\xff\xfe\x00")
    with pytest.raises(errors.FormatError) as info:
        darknet.open_darknet(_weights(tmp_path, 0), cfg=cfg)
    assert info.value.path == str(cfg)
    with pytest.raises(errors.FormatError):
        darknet_torch.build_model(cfg)


def test_builder_refuses_groups_not_dividing_filters(tmp_path: Path) -> None:
    cfg = tmp_path / "net.cfg"
    cfg.write_text(
        NET.replace("channels=3", "channels=4") + "[convolutional]\nfilters=3\ngroups=2\n"
    )
    with pytest.raises(errors.UnsupportedFormatError) as info:
        darknet_torch.build_model(cfg)
    assert info.value.path == str(cfg)


def test_reading_after_file_shrinks_is_a_format_error(tmp_path: Path) -> None:
    r = _open(tmp_path, NET + CONV, 4 + 4 * 3 * 9)
    with r:
        (tmp_path / "w.weights").write_bytes(b"\0" * 24)
        with pytest.raises(errors.FormatError) as info:
            r.read("layers.0.conv.weight")
        assert info.value.path == str(tmp_path / "w.weights")


def test_builder_caps_parameters_before_allocating(tmp_path: Path) -> None:
    cfg = tmp_path / "net.cfg"
    cfg.write_text(NET + "[convolutional]\nfilters=8192\nsize=8\npad=1\n" * 2)
    with pytest.raises(errors.FormatError, match="max_params") as info:
        darknet_torch.build_model(cfg)  # 8192 * 8192 * 8 * 8 floats (16 GiB): never allocated
    assert info.value.path == str(cfg)
    with pytest.raises(errors.FormatError, match="max_params"):
        darknet_torch.build_model(tmp_path / "net.cfg", max_params=10)
