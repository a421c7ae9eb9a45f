"""torch's lazy view bits in a torch file: ``x.conj()`` and ``x.conj().imag`` are saved as the
plain storage plus ``{"conj": True}`` / ``{"neg": True}`` metadata, which the reader must apply
(the values torch.load gives); metadata it does not know is refused, never ignored."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

import savegame as sg
from savegame import errors
from savegame.interop import torch_pickle


def _rewrite_pickle(src: Path, dst: Path, old: bytes, new: bytes) -> None:
    """``src`` with ``old`` replaced by ``new`` (same length) in its data.pkl record."""
    assert len(old) == len(new)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(info, data)


def test_a_conjugate_inside_a_strided_view_reads_as_torch_load(tmp_path: Path) -> None:
    x = torch.randn(4, 3, dtype=torch.complex128)
    y = torch.randn(4, 3, dtype=torch.complex64)  # a float view of it: another storage dtype
    state = {"t": x.conj().t(), "row": x.conj()[1], "neg": y.conj().imag[:, 1:]}
    path = tmp_path / "views.pt"
    torch.save(state, path)
    ref = torch.load(path, weights_only=True)
    got = torch_pickle.load(path)
    for k in state:
        assert torch.equal(got[k].resolve_conj().resolve_neg(), ref[k].resolve_conj().resolve_neg())
    with sg.open(path) as r:
        assert torch.equal(r.read("neg"), ref["neg"].resolve_neg())


@pytest.mark.parametrize(
    ("old", "new", "what"),
    [(b"conj", b"cxnj", "does not know"), (b"\x88", b"K\x01", None)],
    ids=["unknown-key", "non-bool-value"],
)
def test_unknown_tensor_metadata_is_refused(
    tmp_path: Path, old: bytes, new: bytes, what: str | None
) -> None:
    src = tmp_path / "conj.pt"
    torch.save({"c": torch.ones(2, dtype=torch.complex64).conj()}, src)
    bad = tmp_path / "bad.pt"
    if what is None:  # NEWTRUE -> BININT1 1 changes the length: rewrite by hand
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info)
                if info.filename.endswith("data.pkl"):
                    i = data.rindex(b"conj")
                    data = data[:i] + data[i:].replace(b"\x88", b"K\x01", 1)
                zout.writestr(info.filename, data)
    else:
        _rewrite_pickle(src, bad, old, new)
    with pytest.raises(errors.FormatError, match="metadata"):
        torch_pickle.load(bad)


def test_a_conjugate_bit_on_a_real_tensor_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "neg.pt"
    torch.save({"r": torch.ones(2)._neg_view()}, src)
    assert torch.equal(torch_pickle.load(src)["r"], -torch.ones(2))
    bad = tmp_path / "bad.pt"
    _rewrite_pickle(src, bad, b"neg", b"cnj")  # 'cnj' is unknown too: refused either way
    with pytest.raises(errors.FormatError):
        torch_pickle.load(bad)
