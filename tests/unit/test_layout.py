from __future__ import annotations

import pytest

from savegame.format import layout


def test_step_dir_is_zero_padded_and_sorts_in_step_order() -> None:
    assert layout.step_dir(1200) == "step-000000001200"
    names = [layout.step_dir(s) for s in (9, 10, 100, 99999)]
    assert sorted(names) == names


def test_parse_step_dir_inverts_step_dir_and_rejects_others() -> None:
    for s in (0, 1, 10**12 - 1):
        assert layout.parse_step_dir(layout.step_dir(s)) == s
    for name in (
        "step-1",
        "step-00000000120",
        "step-0000000012000",
        ".tmp-step-000000000001-x",
        "x",
        "step-00000000012a",
    ):
        assert layout.parse_step_dir(name) is None


@pytest.mark.parametrize("step", [-1, 10**12])
def test_step_dir_rejects_out_of_range_steps(step: int) -> None:
    with pytest.raises(ValueError):
        layout.step_dir(step)


def test_tmp_dir_is_hidden_and_never_parses_as_a_step() -> None:
    name = layout.tmp_dir(5, "abc")
    assert name.startswith(layout.TMP_PREFIX)
    assert layout.parse_step_dir(name) is None


def test_tensor_file_names_per_rank_and_part() -> None:
    assert layout.tensor_file(0) == "rank-00000.safetensors"
    assert layout.tensor_file(3, 2) == "rank-00003-002.safetensors"
    assert len({layout.tensor_file(r, p) for r in range(3) for p in range(3)}) == 9


def test_only_savegames_own_temp_names_are_leftovers() -> None:
    assert layout.is_tmp(layout.tmp_dir(5, "ab12"))
    assert layout.is_tmp(".tmp-deleted-step-000000000005-0123abcd")
    assert layout.is_tmp(".tmp-deleted-retired-step-000000000001-rank-00000.safetensors-89abcdef")
    for name in (".tmp-notes", ".tmp-", ".tmp-step-5-x", "tmp-step-000000000001-x", "step-000000000001"):
        assert not layout.is_tmp(name), name


def test_a_name_from_a_listing_is_a_step_only_when_it_is_exactly_one() -> None:
    """A trailing newline (``$`` would take it) or another script's digits (``\\d`` and
    ``int`` would read them) must not make a second "step 3" that retention counts and push
    moves (outside review S30)."""
    arabic = "step-" + "٠" * 11 + "٣"
    full = "\uff13"  # fullwidth 3
    for name in (
        "step-000000000003\n",
        "step-000000000003\r",
        arabic,
        "step-00000000000" + full,
        "damaged-step-000000000003-ab\n",
    ):
        assert layout.parse_step_dir(name) is None, repr(name)
        assert layout.parse_damaged_dir(name) is None, repr(name)
    assert layout.parse_damaged_dir("damaged-step-000000000003-ab") == 3
    assert layout.parse_retired_file("retired-step-000000000003-rank-00000.safetensors\n") is None
    assert layout.parse_retired_file("retired-step-" + "٠" * 11 + "٣-rank-00000.safetensors") is None
    assert layout.is_tmp(".tmp-deleted-x") and not layout.is_tmp(".tmp-deleted-x\n")


def test_a_reference_in_a_manifest_takes_ascii_digits_only() -> None:
    from savegame.format import manifest

    assert manifest.ref_step("step-000000000003/rank-00000.safetensors") == 3
    assert manifest.ref_step("step-" + "٠" * 11 + "٣/rank-00000.safetensors") is None
    assert manifest.ref_step("step-000000000003/rank-00000.safetensors\n") is None
