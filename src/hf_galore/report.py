"""How hf_galore prints figures: aligned terminal tables and byte counts (the target table, the memory plan, the
benchmark scripts all go through here)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["GIB", "MIB", "format_table", "gib", "human_bytes", "mib"]

MIB = 2**20
GIB = 2**30


def mib(count: int | float, digits: int = 1) -> str:
    """Bytes as MiB with thousands separators: `mib(3 * 2**20)` -> `'3.0'`."""
    return f"{count / MIB:,.{digits}f}"


def gib(count: int | float, digits: int = 2) -> str:
    """Bytes as GiB with thousands separators: `gib(2**30)` -> `'1.00'`."""
    return f"{count / GIB:,.{digits}f}"


def human_bytes(count: int) -> str:
    """Bytes in the largest unit up to GiB that keeps the number >= 1: `512 B`, `1.5 KiB`, `3.0 MiB`, `2.0 GiB`."""
    size = float(count)
    for unit in ("B", "KiB", "MiB"):
        if abs(size) < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Collection[int] = (),
    rule: bool = False,
    free_last: bool = False,
) -> str:
    """Rows under a header, every column as wide as its widest cell, columns two spaces apart.

    `right`: indices of right-aligned (number) columns. `rule`: a line of dashes under the header. `free_last`: the
    last column is free text, not padded nor counted in the widths. Trailing spaces are stripped.
    """
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"Invalid rows: every row needs {len(header)} cells, as the header {list(header)!r}.")
    aligned = len(header) - 1 if free_last else len(header)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(aligned)]

    def render(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row[:aligned])
        ]
        return "  ".join([*cells, *row[aligned:]]).rstrip()

    lines = [render(header)]
    if rule:
        lines.append(render(["-" * width for width in widths] + ["-" * len(cell) for cell in header[aligned:]]))
    lines.extend(render(row) for row in rows)
    return "\n".join(lines)
