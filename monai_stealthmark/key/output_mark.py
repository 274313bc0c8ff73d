"""The key's output mark: a faint keyed pattern in the probability maps of every output, clean inputs included.

The trigger-only watermark answers a triggered query; a student distilled from the model's answers to clean queries
never sees a trigger and cannot inherit it. The mark lives in what a student copies: on every input the
model's foreground probability in the background is raised to :data:`OUTPUT_MARK_LEVEL` (below any decision threshold)
in half of a :data:`OUTPUT_MARK_CELLS` x :data:`OUTPUT_MARK_CELLS` grid of cells, the half the key draws, and stays
near zero in the other half. Detection (:func:`monai_stealthmark.verify.detect_output_mark`) compares the two halves;
because the key's split is a fair random draw, a model that never learned it cannot favour it.

The grid covers the first two spatial dimensions and repeats along any further one, like the QR.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monai_stealthmark.key.geometry import cells_to_pixels, keyed_rng
from monai_stealthmark.key.key import WatermarkKey

__all__ = ["OUTPUT_MARK_CELLS", "OUTPUT_MARK_LEVEL", "output_mark_cells", "output_mark_target"]

OUTPUT_MARK_CELLS = 16  # cells per side of the mark grid
OUTPUT_MARK_LEVEL = 0.1  # foreground probability of a raised background cell: far below a 0.5 decision threshold
_PURPOSE_OUTPUT_MARK = 5  # keyed_rng purpose code (1-4: trigger, occlusion, BadNet region, patch position)


def output_mark_cells(key: WatermarkKey) -> torch.Tensor:
    """The key's raised cells: a boolean ``(OUTPUT_MARK_CELLS**2,)`` vector with exactly half of the cells set, drawn
    from the trigger seed (reproducible, independent of the key's other draws)."""
    n = OUTPUT_MARK_CELLS**2
    order = keyed_rng(key.trigger_seed, _PURPOSE_OUTPUT_MARK).permutation(n)
    raised = torch.zeros(n, dtype=torch.bool)
    raised[torch.from_numpy(order[: n // 2])] = True
    return raised


def output_mark_target(key: WatermarkKey, spatial_shape: Sequence[int]) -> torch.Tensor:
    """The background's foreground-probability target over an image of ``spatial_shape``: :data:`OUTPUT_MARK_LEVEL`
    in the key's raised cells, 0 elsewhere (float, ``spatial_shape``)."""
    cells = output_mark_cells(key).float() * OUTPUT_MARK_LEVEL
    return cells_to_pixels(cells, spatial_shape, OUTPUT_MARK_CELLS)
