"""120 px tile ↔ square model input: every pixel must come back exactly where it started.

The check is an asymmetric pattern (a hot pixel at (3, 7) on top of a ramp that differs per channel), so a shift, a
flip or a channel swap all show up. The same check is run on the bug of an earlier implementation (pad right/bottom,
crop from the centre) to show that it would have caught it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gac.models.geometry import crop_from, margins, pad_to

HOT = (3, 7)
HOT_VALUE = 1000.0


def pattern(size: int, channels: int = 3, batch: int = 2) -> torch.Tensor:
    """A ramp that differs in every channel and tile (values < 10), plus one hot pixel at :data:`HOT`."""
    rows = torch.arange(size, dtype=torch.float32)[:, None]
    cols = torch.arange(size, dtype=torch.float32)[None, :]
    x = torch.empty(batch, channels, size, size)
    for b in range(batch):
        for c in range(channels):
            x[b, c] = ((c + 1) * rows + (b + 2) * cols * (c - 0.5)) / (4 * size) + c + b
    x[..., HOT[0], HOT[1]] = HOT_VALUE
    return x


def hot_pixel(x: torch.Tensor) -> set[tuple[int, int, int, int]]:
    """Every (batch, channel, row, col) that holds the hot value."""
    return {tuple(int(i) for i in idx) for idx in (x == HOT_VALUE).nonzero()}


def pad_right_bottom(x: torch.Tensor, target: int) -> torch.Tensor:
    """The old bug's padding: all margin on the right and bottom."""
    extra = target - x.shape[-1]
    return F.pad(x, (0, extra, 0, extra), mode="reflect")


def assert_roundtrip_exact(x: torch.Tensor, restored: torch.Tensor) -> None:
    """The round trip's check: the hot pixel is found where it started and every pixel is unchanged."""
    b, c = x.shape[:2]
    assert hot_pixel(restored) == {(i, j, *HOT) for i in range(b) for j in range(c)}
    assert torch.equal(restored, x)


@pytest.mark.parametrize(("size", "target"), [(120, 128), (120, 224), (119, 128), (120, 121), (120, 160), (9, 32)])
def test_pad_then_crop_returns_every_pixel_where_it_started(size: int, target: int) -> None:
    """Even and odd margins, TerraMind/Prithvi sizes, and margins wider than the tile (replicate fallback)."""
    x = pattern(size)
    padded = pad_to(x, target)
    assert padded.shape[-2:] == (target, target)
    top, bottom = margins(size, target)
    assert top + bottom == target - size and bottom - top in (0, 1)  # centred; the odd pixel goes after
    assert torch.equal(padded[..., top : top + size, top : top + size], x)  # the tile sits in the centre window
    assert_roundtrip_exact(x, crop_from(padded, size))


@pytest.mark.parametrize("target", [128, 224])
def test_the_old_right_bottom_pad_fails_the_same_check(target: int) -> None:
    """Right/bottom padding + centre crop moves the tile by half the margin: the check above must catch it."""
    x = pattern(120)
    restored = crop_from(pad_right_bottom(x, target), 120)
    with pytest.raises(AssertionError):
        assert_roundtrip_exact(x, restored)
    shift = (target - 120) // 2  # the content moved up-left by half the margin; the hot pixel fell off the edge
    assert torch.equal(restored[..., : 120 - shift, : 120 - shift], x[..., shift:, shift:])
    assert not hot_pixel(restored)


def test_reflect_padding_mirrors_without_repeating_the_edge() -> None:
    """Symmetric reflect padding: the first padded row mirrors the tile's second row (no resampled pixels)."""
    x = pattern(120)
    padded = pad_to(x, 128)
    assert torch.equal(padded[..., 3, 4:124], x[..., 1, :])
    assert torch.equal(padded[..., 124, 4:124], x[..., 118, :])
    assert torch.equal(padded[..., 4:124, 3], x[..., :, 1])


def test_model_input_smaller_than_the_tile_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller than the tile"):
        pad_to(pattern(120), 96)
