"""Darknet reader and PyTorch builder against the yolov3-tiny structure.

The small fixture's ``.weights`` is generated here with numpy from a hand-written layer list
(independent of the reader's shape propagation), and the reference forward pass uses plain
torch ops on those arrays, never the reader or the builder.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from savegame import errors
from savegame.adapters import darknet_torch
from savegame.interop import base, darknet

FIXTURES = Path(__file__).resolve().parents[1] / "golden" / "foreign" / "darknet"
FULL_CFG = FIXTURES / "yolov3-tiny.cfg"
SMALL_CFG = FIXTURES / "yolov3-tiny-small.cfg"

# (layer index, in channels, filters, kernel size, batch_normalize) for yolov3-tiny-small.cfg.
SMALL_CONVS = [
    (0, 3, 1, 3, True),
    (2, 1, 2, 3, True),
    (4, 2, 4, 3, True),
    (6, 4, 8, 3, True),
    (8, 8, 16, 3, True),
    (10, 16, 32, 3, True),
    (12, 32, 64, 3, True),
    (13, 64, 16, 1, True),
    (14, 16, 32, 3, True),
    (15, 32, 18, 1, False),
    (18, 16, 8, 1, True),
    (21, 24, 16, 3, True),
    (22, 16, 18, 1, False),
]


def make_small_weights(
    seed: int = 0, header: tuple[int, int, int] = (0, 2, 5), seen: int = 32013312
) -> tuple[bytes, dict[str, np.ndarray]]:
    """Darknet-layout bytes for yolov3-tiny-small and the arrays by PyTorch name."""
    rng = np.random.default_rng(seed)
    chunks = [struct.pack("<iii", *header)]
    major, minor = header[0], header[1]
    chunks.append(struct.pack("<Q" if major * 10 + minor >= 2 else "<I", seen))
    arrays: dict[str, np.ndarray] = {}
    for idx, cin, n, k, bn in SMALL_CONVS:
        p = f"layers.{idx}"
        bias = rng.normal(0, 0.1, n).astype("<f4")
        chunks.append(bias.tobytes())
        if bn:
            arrays[f"{p}.bn.bias"] = bias
            gamma = rng.normal(1, 0.1, n).astype("<f4")
            mean = rng.normal(0, 0.1, n).astype("<f4")
            # Some variances near zero so the two epsilon conventions really differ.
            var = rng.uniform(1e-6, 1.0, n).astype("<f4")
            var[0] = 1e-7
            for name, a in (("weight", gamma), ("running_mean", mean), ("running_var", var)):
                arrays[f"{p}.bn.{name}"] = a
                chunks.append(a.tobytes())
        else:
            arrays[f"{p}.conv.bias"] = bias
        weight = rng.normal(0, 0.3, (n, cin, k, k)).astype("<f4")
        arrays[f"{p}.conv.weight"] = weight
        chunks.append(weight.tobytes())
    return b"".join(chunks), arrays


def reference_forward(
    arrays: dict[str, np.ndarray], x: torch.Tensor, convention: str
) -> list[torch.Tensor]:
    """yolov3-tiny-small forward with plain torch ops (no reader, no builder)."""
    t = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}

    def conv(i: int, h: torch.Tensor, k: int, bn: bool) -> torch.Tensor:
        p = f"layers.{i}"
        h = F.conv2d(h, t[f"{p}.conv.weight"], t.get(f"{p}.conv.bias"), padding=k // 2)
        if not bn:
            return h
        mean = t[f"{p}.bn.running_mean"][:, None, None]
        var = t[f"{p}.bn.running_var"][:, None, None]
        if convention == "pjreddie":
            h = (h - mean) / (torch.sqrt(var) + 1e-6)
        else:
            h = (h - mean) / torch.sqrt(var + 1e-5)
        h = h * t[f"{p}.bn.weight"][:, None, None] + t[f"{p}.bn.bias"][:, None, None]
        return torch.where(h > 0, h, 0.1 * h)

    out: dict[int, torch.Tensor] = {}
    h = x
    for i in (0, 2, 4, 6, 8):
        h = conv(i, h, 3, True)
        out[i] = h
        h = F.max_pool2d(h, 2, 2)
    h = conv(10, h, 3, True)
    # layer 11: size=2 stride=1 keeps 2x2 -> 2x2; edge windows see only real pixels
    h = F.max_pool2d(F.pad(h, (0, 1, 0, 1), mode="replicate"), 2, 1)
    h = conv(12, h, 3, True)
    h13 = conv(13, h, 1, True)
    h = conv(14, h13, 3, True)
    head1 = conv(15, h, 1, False)
    h = conv(18, h13, 1, True)
    h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    h = torch.cat([h, out[8]], dim=1)
    h = conv(21, h, 3, True)
    head2 = conv(22, h, 1, False)
    return [head1, head2]


@pytest.fixture()
def small(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    data, arrays = make_small_weights()
    path = tmp_path / "small.weights"
    path.write_bytes(data)
    return path, arrays


# Expected (type, output (c, h, w), float32 values stored) per layer of the real yolov3-tiny.
FULL_LAYERS = [
    ("convolutional", (16, 416, 416), 16 * 4 + 16 * 3 * 9),
    ("maxpool", (16, 208, 208), 0),
    ("convolutional", (32, 208, 208), 32 * 4 + 32 * 16 * 9),
    ("maxpool", (32, 104, 104), 0),
    ("convolutional", (64, 104, 104), 64 * 4 + 64 * 32 * 9),
    ("maxpool", (64, 52, 52), 0),
    ("convolutional", (128, 52, 52), 128 * 4 + 128 * 64 * 9),
    ("maxpool", (128, 26, 26), 0),
    ("convolutional", (256, 26, 26), 256 * 4 + 256 * 128 * 9),
    ("maxpool", (256, 13, 13), 0),
    ("convolutional", (512, 13, 13), 512 * 4 + 512 * 256 * 9),
    ("maxpool", (512, 13, 13), 0),
    ("convolutional", (1024, 13, 13), 1024 * 4 + 1024 * 512 * 9),
    ("convolutional", (256, 13, 13), 256 * 4 + 256 * 1024),
    ("convolutional", (512, 13, 13), 512 * 4 + 512 * 256 * 9),
    ("convolutional", (255, 13, 13), 255 + 255 * 512),
    ("yolo", (255, 13, 13), 0),
    ("route", (256, 13, 13), 0),
    ("convolutional", (128, 13, 13), 128 * 4 + 128 * 256),
    ("upsample", (128, 26, 26), 0),
    ("route", (384, 26, 26), 0),
    ("convolutional", (256, 26, 26), 256 * 4 + 256 * 384 * 9),
    ("convolutional", (255, 26, 26), 255 + 255 * 256),
    ("yolo", (255, 26, 26), 0),
]


def test_yolov3_tiny_layer_sizes_match_the_published_network() -> None:
    plan = darknet.plan_layers(darknet.parse_cfg(FULL_CFG.read_text()))
    got = [(layer.type, layer.out_shape, layer.nfloats) for layer in plan]
    assert got == FULL_LAYERS
    counts = {t: sum(1 for layer in plan if layer.type == t) for t in {x.type for x in plan}}
    assert counts == {"convolutional": 13, "maxpool": 6, "route": 2, "upsample": 1, "yolo": 2}
    # The published yolov3-tiny.weights is 35,434,956 bytes: 20-byte header + floats.
    assert 20 + 4 * sum(layer.nfloats for layer in plan) == 35_434_956


def test_full_cfg_reader_lists_every_tensor_with_shapes(tmp_path: Path) -> None:
    # A sparse file of the right size: the reader must not read data to list tensors.
    path = tmp_path / "yolov3-tiny.weights"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<iiiQ", 0, 2, 0, 0))
        fh.truncate(35_434_956)
    with darknet.open_darknet(path, cfg=FULL_CFG) as r:
        assert r.format == "darknet"
        assert len(r.keys()) == 11 * 5 + 2 * 2
        assert r.keys()[:5] == [
            "layers.0.bn.bias",
            "layers.0.bn.weight",
            "layers.0.bn.running_mean",
            "layers.0.bn.running_var",
            "layers.0.conv.weight",
        ]
        assert r.info("layers.12.conv.weight") == base.TensorInfo(
            "layers.12.conv.weight", "float32", (1024, 512, 3, 3), 1024 * 512 * 9 * 4
        )
        assert r.info("layers.15.conv.bias").shape == (255,)
        meta = r.metadata()
        assert meta["complete"] and meta["loaded_layers"] == meta["weighted_layers"] == 13
        assert (meta["major"], meta["minor"], meta["revision"]) == (0, 2, 0)


def test_small_weights_load_exactly_and_forward_matches_reference(
    small: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, arrays = small
    with darknet.open_darknet(path, cfg=SMALL_CFG) as r:
        assert r.keys() == list(arrays)
        for name, expected in arrays.items():
            got = r.read(name)
            assert got.dtype == torch.float32
            assert torch.equal(got, torch.from_numpy(expected.copy())), name
        assert r.verify() == []
        meta = r.metadata()
        assert meta["seen"] == 32013312 and meta["revision"] == 5
        assert meta["bytes_consumed"] == meta["file_size"] == path.stat().st_size
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    results = {}
    for convention in ("alexeyab", "pjreddie"):
        model = darknet_torch.load_darknet(SMALL_CFG, path, bn=convention)
        state = model.state_dict()
        for name, expected in arrays.items():
            assert torch.equal(state[name], torch.from_numpy(expected.copy())), name
        with torch.no_grad():
            outs = model(x)
        ref = reference_forward(arrays, x, convention)
        assert [o.shape for o in outs] == [(2, 18, 2, 2), (2, 18, 4, 4)]
        for o, e in zip(outs, ref, strict=True):
            torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
        results[convention] = outs
    # The conventions differ measurably (a running variance of 1e-7 is in the file).
    assert not torch.allclose(results["alexeyab"][0], results["pjreddie"][0], atol=1e-3)
    # And each reference differs from the other convention's model: the switch matters.
    other = reference_forward(arrays, x, "pjreddie")
    assert not torch.allclose(results["alexeyab"][1], other[1], atol=1e-3)


def test_default_bn_convention_is_alexeyab_like_torch_batchnorm() -> None:
    bn = darknet_torch.DarknetBatchNorm(3)
    ref = torch.nn.BatchNorm2d(3, eps=1e-5).eval()
    with torch.no_grad():
        for mod in (bn, ref):
            mod.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            mod.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
            mod.running_mean.copy_(torch.tensor([0.5, 0.0, -1.0]))
            mod.running_var.copy_(torch.tensor([1e-6, 2.0, 0.25]))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(bn(x), ref(x))
    with pytest.raises(ValueError):
        darknet_torch.DarknetBatchNorm(3, "other")  # type: ignore[arg-type]


def test_truncated_backbone_lists_only_full_layers(
    small: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    path, arrays = small
    # Keep header + layers 0..8 (5 conv layers) — a backbone like darknet53.conv.74.
    plan = darknet.plan_layers(darknet.parse_cfg(SMALL_CFG.read_text()))
    end = 20 + 4 * sum(layer.nfloats for layer in plan[:9])
    cut = tmp_path / "backbone.weights"
    cut.write_bytes(path.read_bytes()[:end])
    with darknet.open_darknet(cut, cfg=SMALL_CFG, partial=True) as r:
        assert r.keys() == [k for k in arrays if int(k.split(".")[1]) <= 8]
        meta = r.metadata()
        assert meta["loaded_layers"] == 5 and meta["weighted_layers"] == 13
        assert meta["bytes_consumed"] == end == meta["file_size"]
        assert meta["bytes_needed"] == path.stat().st_size
        assert not meta["complete"]
        assert r.verify() == []
        with pytest.raises(errors.CheckpointNotFoundError) as info:
            r.read("layers.10.conv.weight")
        assert info.value.path == str(cut)
    with pytest.raises(errors.FormatError) as exc:
        darknet.open_darknet(cut, cfg=SMALL_CFG)
    assert exc.value.path == str(cut) and "shorter" in str(exc.value)
    model = darknet_torch.build_model(SMALL_CFG)
    with darknet.open_darknet(cut, cfg=SMALL_CFG, partial=True) as r:
        missing = darknet_torch.load_weights(model, r)
    assert "layers.10.conv.weight" in missing and "layers.8.conv.weight" not in missing
    assert torch.equal(
        model.state_dict()["layers.8.conv.weight"],
        torch.from_numpy(arrays["layers.8.conv.weight"].copy()),
    )


def test_file_cut_inside_a_layer_is_reported_by_verify(
    small: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    path, _ = small
    cut = tmp_path / "cut.weights"
    cut.write_bytes(path.read_bytes()[:-10])
    with darknet.open_darknet(cut, cfg=SMALL_CFG, partial=True) as r:
        problems = r.verify()
        assert len(problems) == 1 and "layer 22" in problems[0]
        assert "layers.22.conv.weight" not in r.keys()
        assert "layers.21.conv.weight" in r.keys()
        assert r.metadata()["loaded_layers"] == 12
    with pytest.raises(errors.FormatError):
        darknet.open_darknet(cut, cfg=SMALL_CFG)


def test_trailing_bytes_are_reported(
    small: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    path, _ = small
    longer = tmp_path / "long.weights"
    longer.write_bytes(path.read_bytes() + b"\0" * 8)
    with darknet.open_darknet(longer, cfg=SMALL_CFG, partial=True) as r:
        assert any("8 trailing bytes" in p for p in r.verify())
    with pytest.raises(errors.FormatError) as exc:
        darknet.open_darknet(longer, cfg=SMALL_CFG)
    assert "longer" in str(exc.value)


def test_old_header_has_4_byte_seen_and_transposed_connected(tmp_path: Path) -> None:
    cfg = tmp_path / "fc.cfg"
    cfg.write_text(
        "[net]\nwidth=2\nheight=1\nchannels=3\n"
        "[connected]\noutput=4\nactivation=linear\n"
        "[connected]\noutput=2\nbatch_normalize=1\nactivation=relu\n"
    )
    rng = np.random.default_rng(1)
    b1 = rng.normal(size=4).astype("<f4")
    w1 = rng.normal(size=(4, 6)).astype("<f4")
    b2 = rng.normal(size=2).astype("<f4")
    w2 = rng.normal(size=(2, 4)).astype("<f4")
    scales, mean, var = (rng.uniform(0.5, 1, 2).astype("<f4") for _ in range(3))
    for major, transposed in ((0, False), (1001, True)):
        stored1 = w1.T if transposed else w1
        stored2 = w2.T if transposed else w2
        data = struct.pack("<iiiI", major, 1, 0, 7) + b"".join(
            np.ascontiguousarray(a).tobytes() for a in (b1, stored1, b2, stored2, scales, mean, var)
        )
        path = tmp_path / f"fc{major}.weights"
        path.write_bytes(data)
        with darknet.open_darknet(path, cfg=cfg) as r:
            assert r.header.header_bytes == 16 and r.header.seen == 7
            assert r.header.transposed is transposed
            assert r.keys() == [
                "layers.0.fc.bias",
                "layers.0.fc.weight",
                "layers.1.bn.bias",
                "layers.1.fc.weight",
                "layers.1.bn.weight",
                "layers.1.bn.running_mean",
                "layers.1.bn.running_var",
            ]
            assert torch.equal(r.read("layers.0.fc.weight"), torch.from_numpy(w1))
            assert torch.equal(r.read("layers.1.fc.weight"), torch.from_numpy(w2))
        model = darknet_torch.load_darknet(cfg, path)
        x = torch.randn(1, 3, 1, 2)
        h = x.flatten(1) @ torch.from_numpy(w1).T + torch.from_numpy(b1)
        h = h @ torch.from_numpy(w2).T
        h = (h - torch.from_numpy(mean)) / torch.sqrt(torch.from_numpy(var) + 1e-5)
        h = torch.relu(h * torch.from_numpy(scales) + torch.from_numpy(b2))
        with torch.no_grad():
            torch.testing.assert_close(model(x)[0].flatten(1), h)


def test_dontload_and_dontloadscales_skip_bytes(tmp_path: Path) -> None:
    cfg = tmp_path / "d.cfg"
    cfg.write_text(
        "[net]\nwidth=4\nheight=4\nchannels=2\n"
        "[convolutional]\nfilters=3\nsize=1\nbatch_normalize=1\ndontloadscales=1\n"
        "[convolutional]\nfilters=2\nsize=1\ndontload=1\n"
        "[convolutional]\nfilters=2\nsize=3\npad=1\ngroups=2\n"
    )
    floats = 3 + 3 * 2 + 2 + 2 * 1 * 9
    path = tmp_path / "d.weights"
    path.write_bytes(struct.pack("<iiiQ", 0, 2, 5, 0) + np.arange(floats, dtype="<f4").tobytes())
    with darknet.open_darknet(path, cfg=cfg) as r:
        assert r.keys() == [
            "layers.0.bn.bias",
            "layers.0.conv.weight",
            "layers.2.conv.bias",
            "layers.2.conv.weight",
        ]
        assert r.read("layers.2.conv.bias").tolist() == [9.0, 10.0]
        assert r.info("layers.2.conv.weight").shape == (2, 1, 3, 3)


def test_route_groups_shortcut_and_maxpool_shapes(tmp_path: Path) -> None:
    cfg = tmp_path / "r.cfg"
    cfg.write_text(
        "[net]\nwidth=9\nheight=9\nchannels=4\n"
        "[convolutional]\nfilters=8\nsize=3\nstride=2\npad=1\nactivation=leaky\n"  # 0: 8x5x5
        "[route]\nlayers=-1\ngroups=2\ngroup_id=1\n"  # 1: 4x5x5
        "[convolutional]\nfilters=8\nsize=1\nactivation=linear\n"  # 2: 8x5x5
        "[shortcut]\nfrom=-3\nactivation=linear\n"  # 3: 8x5x5
        "[maxpool]\nsize=3\nstride=2\n"  # 4: (5+2-3)/2+1 = 3
        "[upsample]\nstride=3\n"  # 5: 9x9
        "[route]\nlayers=5,2\n"  # spatial mismatch 9 vs 5 -> error
    )
    with pytest.raises(errors.FormatError, match="spatial sizes differ"):
        darknet.plan_layers(darknet.parse_cfg(cfg.read_text()))
    text = cfg.read_text().rsplit("[route]", 1)[0] + "[avgpool]\n"
    cfg.write_text(text)
    plan = darknet.plan_layers(darknet.parse_cfg(text))
    assert [p.out_shape for p in plan] == [
        (8, 5, 5),
        (4, 5, 5),
        (8, 5, 5),
        (8, 5, 5),
        (8, 3, 3),
        (8, 9, 9),
        (8, 1, 1),
    ]
    assert plan[3].params["sources"] == [0]
    # The builder agrees with the planned shapes (random weights are fine for shapes).
    model = darknet_torch.build_model(cfg)
    with torch.no_grad():
        (out,) = model(torch.randn(1, 4, 9, 9))
    assert out.shape == (1, 8, 1, 1)


def test_builder_refuses_unsupported_layers(tmp_path: Path) -> None:
    cfg = tmp_path / "x.cfg"
    cfg.write_text("[net]\nwidth=4\nheight=4\nchannels=1\n[reorg]\nstride=2\n")
    with pytest.raises(errors.UnsupportedFormatError) as info:
        darknet_torch.build_model(cfg)
    assert info.value.path == str(cfg)
    cfg.write_text("[net]\nwidth=4\nheight=4\nchannels=1\n[convolutional]\nactivation=weird\n")
    with pytest.raises(errors.UnsupportedFormatError):
        darknet_torch.build_model(cfg)
    cfg.write_text("[net]\nwidth=4\nheight=4\nchannels=1\n[lstm]\noutput=2\n")
    with pytest.raises(errors.UnsupportedFormatError):
        darknet.plan_layers(darknet.parse_cfg(cfg.read_text(), path=str(cfg)), path=str(cfg))


def test_cfg_parser_follows_darknet_whitespace_and_comment_rules() -> None:
    text = (
        "# comment\n[net]\n width = 8 \nheight=8\nchannels=1\n; another\n"
        "[CONV]\nfilters = 2 # trailing\nsize=1\nfilters=99\n"
    )
    sections = darknet.parse_cfg(text)
    assert [s.type for s in sections] == ["net", "convolutional"]
    assert sections[1].options["filters"] == "2"  # first occurrence wins, like option_find
    plan = darknet.plan_layers(sections)
    assert plan[0].out_shape == (2, 8, 8)


def test_flipped_conv_weights_are_transposed_back(tmp_path: Path) -> None:
    cfg = tmp_path / "f.cfg"
    cfg.write_text(
        "[net]\nwidth=3\nheight=3\nchannels=2\n[convolutional]\nfilters=3\nsize=1\nflipped=1\n"
    )
    weight = np.arange(3 * 2, dtype="<f4").reshape(3, 2, 1, 1)
    bias = np.zeros(3, "<f4")
    stored = np.ascontiguousarray(weight.reshape(3, 2).T)  # (c*k*k, n), as darknet writes it
    path = tmp_path / "f.weights"
    path.write_bytes(struct.pack("<iiiQ", 0, 2, 0, 0) + bias.tobytes() + stored.tobytes())
    with darknet.open_darknet(path, cfg=cfg) as r:
        assert torch.equal(r.read("layers.0.conv.weight"), torch.from_numpy(weight))


def test_partial_file_loads_only_when_asked_and_says_how_much_it_filled(
    small: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    # Issue 9.15: a file shorter than its cfg used to load silently, later layers left at init.
    path, arrays = small
    plan = darknet.plan_layers(darknet.parse_cfg(SMALL_CFG.read_text()))
    cut = tmp_path / "backbone.weights"
    cut.write_bytes(path.read_bytes()[: 20 + 4 * sum(layer.nfloats for layer in plan[:9])])
    with pytest.raises(errors.FormatError, match=r"holds 5 of the 13 layers.*partial=True") as ei:
        darknet_torch.load_darknet(SMALL_CFG, cut)
    assert ei.value.path == str(cut)
    model = darknet_torch.load_darknet(SMALL_CFG, cut, partial=True)
    assert model.coverage is not None and str(model.coverage) == "5 of 13 layers present"
    assert not model.coverage.complete
    assert torch.equal(
        model.state_dict()["layers.8.conv.weight"],
        torch.from_numpy(arrays["layers.8.conv.weight"].copy()),
    )
    full = darknet_torch.load_darknet(SMALL_CFG, path)
    assert full.coverage is not None and full.coverage.complete
    assert str(full.coverage) == "13 of 13 layers present"
    with darknet.open_darknet(path, cfg=SMALL_CFG) as r:
        assert r.coverage == darknet.Coverage(13, 13)
