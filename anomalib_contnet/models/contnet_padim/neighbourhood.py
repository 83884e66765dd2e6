"""Patch grids moved by whole cells: the shared step of the levers that look at neighbouring patches.

``neighbourhood`` (fitting) gives every position the training patches of the positions within
``r`` cells, so each Gaussian also learns the small shifts of its surroundings;
``shift_tolerance`` (scoring) lets a test patch be explained by the Gaussian of any position
within ``s`` cells; ``patch_context`` (embedding) appends the neighbours' features to each patch.
All move a (..., H, W) grid by whole cells with padding and slicing only (exportable): the first
two repeat the border row or column where the move leaves the grid, the context reads zeros there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

__all__ = ["inside", "offsets", "refuse_bad_cells", "shifted"]


def refuse_bad_cells(name: str, cells: object) -> None:
    """Raise ValueError unless ``cells`` is a whole number of patch cells >= 0 (bools refused)."""
    if isinstance(cells, bool) or not isinstance(cells, int) or cells < 0:
        msg = f"{name} must be a whole number of patch cells >= 0 (0: the paper's), got {cells!r}"
        raise ValueError(msg)


def offsets(radius: int) -> list[tuple[int, int]]:
    """Every (rows, columns) move of at most ``radius`` cells along each axis, (0, 0) first."""
    moves = [(rows, columns) for rows in range(-radius, radius + 1) for columns in range(-radius, radius + 1)]
    return sorted(moves, key=lambda move: move != (0, 0))


def shifted(grid: torch.Tensor, rows: int, columns: int, zeros: bool = False) -> torch.Tensor:
    """``grid`` (B, C, H, W) read ``rows`` cells down and ``columns`` right: out[i, j] = grid[i + rows, j + columns].

    Positions whose source lies outside the grid take the nearest border cell, or zeros with ``zeros``.
    """
    if rows == 0 and columns == 0:
        return grid
    height, width = grid.shape[-2:]
    pad = (max(-columns, 0), max(columns, 0), max(-rows, 0), max(rows, 0))
    padded = F.pad(grid, pad, mode="constant" if zeros else "replicate")
    top, left = max(rows, 0), max(columns, 0)
    return padded[..., top : top + height, left : left + width]


def inside(height: int, width: int, rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """(H, W) mask of the positions whose source ``(i + rows, j + columns)`` lies inside the grid."""

    def within(size: int, move: int) -> torch.Tensor:
        source = torch.arange(size, device=device) + move
        return (source >= 0) & (source < size)

    return within(height, rows).unsqueeze(1) & within(width, columns).unsqueeze(0)
