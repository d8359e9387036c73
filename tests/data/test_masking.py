"""MIC's block masks (`jaxda/data/masking.py`) against NumPy and PyTorch's nearest resize."""

import jax
import numpy as np
import pytest

from jaxda.data import masking


@pytest.mark.parametrize(("cells", "length"), [(16, 512), (2, 80), (3, 100), (5, 7), (4, 4)])
def test_nearest_indices_match_pytorch(cells, length):
    torch = pytest.importorskip("torch")
    grid = torch.arange(cells, dtype=torch.float32).reshape(1, 1, cells, 1)
    expected = torch.nn.functional.interpolate(grid, size=(length, 1), mode="nearest")
    np.testing.assert_array_equal(masking.nearest_indices(cells, length), expected.numpy().ravel())


def test_nearest_indices_repeat_cells_when_the_block_divides_the_size():
    np.testing.assert_array_equal(masking.nearest_indices(4, 64), np.repeat(np.arange(4), 16))


def test_grid_rounds_half_to_even_as_python_round():
    assert masking.grid_shape((80, 112), 32) == (2, 4)  # 2.5 -> 2, 3.5 -> 4.
    assert masking.grid_shape((512, 1024), 64) == (8, 16)
    with pytest.raises(ValueError, match="block size 64 leaves no cell in a 16x32 image"):
        masking.grid_shape((16, 32), 64)


def test_block_masks_are_constant_blocks_masking_the_ratio():
    """64 x 128 images, blocks of 8: every 8 x 8 block is all kept or all masked, masks differ
    between images, and over 64 images x 128 cells the masked share is 0.7 within 4 standard
    errors of a Bernoulli(0.7) mean."""
    batch, ratio = 64, 0.7
    keep = np.asarray(masking.block_mask(jax.random.key(0), batch, (64, 128), 8, ratio))
    assert keep.shape == (batch, 64, 128) and keep.dtype == bool
    cells = keep.reshape(batch, 8, 8, 16, 8)
    assert np.all(cells == cells[:, :, :1, :, :1])
    masked = 1.0 - cells[:, :, 0, :, 0].mean()
    assert abs(masked - ratio) <= 4 * np.sqrt(ratio * (1 - ratio) / (batch * 128))
    assert not np.array_equal(keep[0], keep[1])
    # The same key draws the same masks.
    again = masking.block_mask(jax.random.key(0), batch, (64, 128), 8, ratio)
    np.testing.assert_array_equal(keep, again)


def test_masked_pixels_become_zero_in_every_channel():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    keep = rng.random((2, 16, 16)) > 0.5
    out = np.asarray(masking.apply_mask(images, keep))
    np.testing.assert_array_equal(out, np.where(keep[..., None], images, 0.0))
