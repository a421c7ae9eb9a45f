"""savegame.adapters.mapping: Keras layouts -> PyTorch modules.

The end-to-end tests load the real Keras CNNs saved by TensorFlow (tests/golden/foreign/
tensorflow) into the equivalent PyTorch CNN and compare outputs with the ones Keras computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from savegame import errors
from savegame.adapters import mapping
from savegame.interop import tensorflow

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "foreign" / "tensorflow"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
C_IN, FILTERS, H, W, CLASSES = 2, 3, 6, 6, 4


class TorchCNN(nn.Module):
    """The PyTorch twin of make_fixtures._cnn (Keras BN defaults: eps=1e-3, momentum=0.99)."""

    def __init__(self, bn_eps: float = 1e-3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, FILTERS, 3, padding=1)  # Keras padding="same", stride 1
        self.bn = nn.BatchNorm2d(FILTERS, eps=bn_eps, momentum=0.01)
        self.fc = nn.Linear(FILTERS * H * W, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(x, 1))


def _inputs() -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    with np.load(GOLDEN / "expected.npz", allow_pickle=False) as f:
        x_nhwc = f["input"]
        out_k3, out_k2 = f["keras3_output"], f["tfkeras_output"]
    return torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous(), x_nhwc, out_k3, out_k2


def _tfkeras_mappings(flatten: bool = True) -> list[mapping.WeightMapping]:
    def k(layer: int, var: str) -> str:
        return f"model/layer_with_weights-{layer}/{var}/.ATTRIBUTES/VARIABLE_VALUE"

    return [
        *mapping.conv2d("conv", kernel=k(0, "kernel"), bias=k(0, "bias")),
        *mapping.batch_norm(
            "bn",
            gamma=k(1, "gamma"),
            beta=k(1, "beta"),
            moving_mean=k(1, "moving_mean"),
            moving_variance=k(1, "moving_variance"),
        ),
        *mapping.dense(
            "fc",
            kernel=k(2, "kernel"),
            bias=k(2, "bias"),
            flatten_from=(FILTERS, H, W) if flatten else None,
        ),
    ]


def test_keras2_cnn_from_tf_checkpoint_matches_keras_output() -> None:
    x, _, _, want = _inputs()
    model = TorchCNN().eval()
    with tensorflow.open_tensorflow(GOLDEN / "tfkeras") as r:
        left = mapping.apply_mappings(model, _tfkeras_mappings(), r)
    assert left == ["bn.num_batches_tracked"]
    with torch.no_grad():
        got = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_keras3_cnn_named_through_variable_names_matches_keras_output() -> None:
    x, _, want, _ = _inputs()
    with tensorflow.open_tensorflow(GOLDEN / "keras3") as r:
        # Keras 3 keys model weights under the optimizer; look them up by variable name.
        by_name = {v: k for k, v in r.metadata()["variable_names"].items()}

        def k(name: str) -> str:
            return by_name[f"sequential/{name}"]

        maps = [
            *mapping.conv2d("conv", kernel=k("conv/kernel"), bias=k("conv/bias")),
            *mapping.batch_norm(
                "bn",
                gamma=k("bn/gamma"),
                beta=k("bn/beta"),
                moving_mean=k("bn/moving_mean"),
                moving_variance=k("bn/moving_variance"),
            ),
            *mapping.dense(
                "fc", kernel=k("fc/kernel"), bias=k("fc/bias"), flatten_from=(FILTERS, H, W)
            ),
        ]
        model = TorchCNN().eval()
        mapping.apply_mappings(model, maps, r)
    with torch.no_grad():
        got = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_wrong_flatten_order_or_bn_eps_is_detected() -> None:
    # Guards that the end-to-end test can fail: both classic mistakes change the output.
    x, _, _, want = _inputs()
    with tensorflow.open_tensorflow(GOLDEN / "tfkeras") as r:
        no_perm = TorchCNN().eval()
        mapping.apply_mappings(no_perm, _tfkeras_mappings(flatten=False), r)
        torch_eps = TorchCNN(bn_eps=1e-5).eval()
        mapping.apply_mappings(torch_eps, _tfkeras_mappings(), r)
    with torch.no_grad():
        assert np.abs(no_perm(x).numpy() - want).max() > 1e-3
        assert np.abs(torch_eps(x).numpy() - want).max() > 1e-5


def test_dense_kernel_transposes() -> None:
    k = torch.arange(6.0).reshape(3, 2)  # (in, out)
    lin = nn.Linear(3, 2)
    mapping.apply_mappings(
        lin, mapping.dense("", kernel="k", bias="b"), {"k": k, "b": torch.ones(2)}
    )
    x = torch.randn(5, 3)
    torch.testing.assert_close(lin(x), x @ k + 1)


def test_conv2d_kernel_matches_nhwc_convolution() -> None:
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 2, 4, 5)).astype(np.float32)  # (kh, kw, in, out)
    x = rng.normal(size=(1, 6, 7, 4)).astype(np.float32)  # NHWC
    # Reference "valid" cross-correlation in NHWC, Keras semantics.
    ref = np.zeros((1, 4, 6, 5), np.float32)
    for i in range(4):
        for j in range(6):
            ref[0, i, j] = np.einsum("hwc,hwco->o", x[0, i : i + 3, j : j + 2], kernel)
    conv = nn.Conv2d(4, 5, (3, 2), bias=False)
    mapping.apply_mappings(conv, mapping.conv2d("", kernel="k"), {"k": kernel})
    got = conv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(got.detach().numpy(), ref, atol=1e-5)


def test_conv1d_and_depthwise_kernels() -> None:
    rng = np.random.default_rng(2)
    k1 = torch.from_numpy(rng.normal(size=(3, 4, 5)).astype(np.float32))
    assert mapping.conv1d_kernel(k1).shape == (5, 4, 3)
    assert torch.equal(mapping.conv1d_kernel(k1)[2, 1, 0], k1[0, 1, 2])
    kd = torch.from_numpy(rng.normal(size=(3, 3, 4, 2)).astype(np.float32))  # mult 2
    w = mapping.depthwise_conv2d_kernel(kd)
    assert w.shape == (8, 1, 3, 3)
    # output channel i*mult + m is input channel i, multiplier m
    assert torch.equal(w[3, 0], kd[:, :, 1, 1])
    conv = nn.Conv2d(4, 8, 3, groups=4)
    mapping.apply_mappings(
        conv, mapping.depthwise_conv2d("", kernel="k", bias="b"), {"k": kd, "b": torch.zeros(8)}
    )
    conv1 = nn.Conv1d(4, 5, 3)
    mapping.apply_mappings(conv1, mapping.conv1d("", kernel="k"), {"k": k1})
    assert torch.equal(conv1.weight, mapping.conv1d_kernel(k1))


def test_flattened_dense_kernel_matches_keras_flatten() -> None:
    rng = np.random.default_rng(3)
    c, h, w, out = 3, 2, 4, 5
    act_nhwc = rng.normal(size=(1, h, w, c)).astype(np.float32)
    kernel = rng.normal(size=(h * w * c, out)).astype(np.float32)
    keras_out = act_nhwc.reshape(1, -1) @ kernel  # Keras Flatten of NHWC
    weight = mapping.flattened_dense_kernel(torch.from_numpy(kernel), chw=(c, h, w))
    act_nchw = torch.from_numpy(act_nhwc).permute(0, 3, 1, 2)
    torch_out = torch.flatten(act_nchw, 1) @ weight.t()
    np.testing.assert_allclose(torch_out.numpy(), keras_out, atol=1e-5)
    with pytest.raises(errors.RestoreError, match="flatten_from"):
        mapping.flattened_dense_kernel(torch.from_numpy(kernel), chw=(c, h, w + 1))


def test_batch_norm_without_scale_or_center() -> None:
    src = {"m": torch.full((3,), 0.5), "v": torch.full((3,), 2.0)}
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.fill_(7)
        bn.bias.fill_(7)
    maps = mapping.batch_norm("", gamma=None, beta=None, moving_mean="m", moving_variance="v")
    assert mapping.apply_mappings(bn, maps, src) == ["num_batches_tracked"]
    assert torch.equal(bn.weight, torch.ones(3)) and torch.equal(bn.bias, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.full((3,), 2.0))
    plain = nn.BatchNorm1d(3, affine=False)  # no weight/bias: the fills are skipped
    assert mapping.apply_mappings(plain, maps, src) == ["num_batches_tracked"]


def test_shape_mismatch_is_typed_and_leaves_module_untouched() -> None:
    lin = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    src = {"k": torch.ones(3, 2), "b": torch.ones(5)}
    with pytest.raises(errors.RestoreError) as ei:
        mapping.apply_mappings(lin, mapping.dense("", kernel="k", bias="b"), src)
    assert ei.value.key == "bias"
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])  # weight was valid but not written: all or nothing


def test_mapping_errors_are_typed() -> None:
    lin = nn.Linear(3, 2)
    with pytest.raises(errors.CheckpointNotFoundError) as e1:
        mapping.apply_mappings(lin, mapping.dense("", kernel="missing"), {})
    assert e1.value.key == "missing"
    with pytest.raises(errors.RestoreError, match="no parameter"):
        mapping.apply_mappings(lin, mapping.dense("fc", kernel="k"), {"k": torch.ones(3, 2)})
    with pytest.raises(errors.RestoreError, match="dtype kind"):
        mapping.apply_mappings(lin, mapping.dense("", kernel="k"), {"k": torch.ones(3, 2).long()})
    with pytest.raises(errors.FormatError, match="not numeric"):
        mapping.apply_mappings(
            lin, [mapping.WeightMapping("bias", "s")], {"s": np.array([b"a", b"b"])}
        )
    with pytest.raises(errors.RestoreError, match="two mappings"):
        mapping.apply_mappings(
            lin,
            [mapping.WeightMapping("bias", "b"), mapping.WeightMapping("bias", "b")],
            {"b": torch.ones(2)},
        )
    with pytest.raises(errors.RestoreError, match="rank 4"):
        mapping.conv2d_kernel(torch.ones(3, 3))


def test_lower_precision_sources_are_cast_to_the_parameter_dtype() -> None:
    lin = nn.Linear(2, 2)
    k = torch.tensor([[1.5, -2.0], [0.25, 4.0]], dtype=torch.bfloat16)
    mapping.apply_mappings(lin, mapping.dense("", kernel="k"), {"k": k})
    assert lin.weight.dtype == torch.float32
    torch.testing.assert_close(lin.weight, k.float().t())


def test_parameters_are_updated_in_place() -> None:
    lin = nn.Linear(3, 2)
    ref = lin.weight
    mapping.apply_mappings(lin, mapping.dense("", kernel="k"), {"k": np.ones((3, 2), np.float32)})
    assert lin.weight is ref and torch.equal(ref, torch.ones(2, 3))
