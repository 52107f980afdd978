"""hf_galore.report: the one table renderer and byte formatter behind the target table, the plan and benchmarks."""

import pytest

from hf_galore.report import format_table, gib, human_bytes, mib


def test_columns_align_numbers_right_and_free_text_stays_unpadded():
    table = format_table(
        ("name", "bytes", "note"), [("a", "1", "short"), ("longer", "1,024", "")], right={1}, rule=True, free_last=True
    )
    assert table.splitlines() == [
        "name    bytes  note",
        "------  -----  ----",
        "a           1  short",
        "longer  1,024",
    ]


def test_a_row_of_the_wrong_length_is_an_error():
    with pytest.raises(ValueError, match=r"every row needs 2 cells, as the header \['a', 'b'\]"):
        format_table(("a", "b"), [("1",)])


@pytest.mark.parametrize(
    ("count", "text"),
    [(512, "512 B"), (1536, "1.5 KiB"), (3 * 2**20, "3.0 MiB"), (2**30, "1.0 GiB"), (5 * 2**40, "5120.0 GiB")],
)
def test_human_bytes(count, text):
    assert human_bytes(count) == text


def test_mib_and_gib():
    assert mib(1536 * 2**20) == "1,536.0" and gib(3 * 2**29) == "1.50" and gib(2**30, digits=0) == "1"
