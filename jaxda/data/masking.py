"""MIC's block masks (Hoyer et al. CVPR 2023, `BlockMaskGenerator`): random patches of an image
set to 0 in normalised space (the normalisation mean colour), on the device inside the step.

Per image, a grid of round(H / block) x round(W / block) cells (Python's round: half to even)
is drawn uniformly in [0, 1); a cell is kept where its draw exceeds `ratio` (so about `ratio`
of the cells are masked), and the grid is resized to H x W with nearest-neighbour sampling as
PyTorch's `F.interpolate(mode='nearest')` computes it: output pixel i reads cell
floor(i x cells / H) (float32 scale, clipped to the last cell). The grid starts at the crop's
top-left corner; with H and W multiples of `block` every cell is a block x block patch.
"""

import jax
import numpy as np


def grid_shape(size: tuple[int, int], block: int) -> tuple[int, int]:
    """(cells along H, cells along W) of an image of `size` = (H, W)."""
    if block < 1:
        raise ValueError(f"MIC block size must be >= 1; got {block}")
    cells = tuple(round(s / block) for s in size)
    if min(cells) < 1:
        raise ValueError(
            f"MIC block size {block} leaves no cell in a {size[0]}x{size[1]} image: use a block "
            "size of at most twice the image's shorter side"
        )
    return cells


def nearest_indices(cells: int, length: int) -> np.ndarray:
    """[length] int32: the cell each output pixel reads (PyTorch's legacy 'nearest')."""
    scale = np.float32(cells) / np.float32(length)
    index = np.floor(np.arange(length, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(index, cells - 1)


def block_mask(key: jax.Array, batch: int, size: tuple[int, int], block: int, ratio: float):
    """[batch, H, W] bool: True where the image is kept (an independent mask per image)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"MIC mask ratio must be in [0, 1]; got {ratio}")
    cells = grid_shape(size, block)
    keep = jax.random.uniform(key, (batch, *cells)) > ratio
    rows, cols = (nearest_indices(c, s) for c, s in zip(cells, size, strict=True))
    return keep[:, rows][:, :, cols]


def apply_mask(images: jax.Array, keep: jax.Array) -> jax.Array:
    """images [B, H, W, C] (normalised) x keep [B, H, W]: masked pixels become 0."""
    return images * keep[..., None].astype(images.dtype)
