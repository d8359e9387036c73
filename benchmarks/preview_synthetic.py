"""Writes a PNG grid previewing the synthetic source ("game") and target ("real") domains.

Rows: source images, their colourised labels, target images, their colourised labels.

    python benchmarks/preview_synthetic.py --out /tmp/synthetic_preview.png
"""

import argparse

import numpy as np
from PIL import Image

from jaxda.data import labels, synthetic


def preview_grid(n: int, height: int, width: int, seed: int, split: str) -> np.ndarray:
    """-> [4 * height + gaps, n * width + gaps, 3] uint8 grid of n scenes per domain."""
    gap = 4
    rows = []
    for domain in synthetic.DOMAINS:
        pairs = [
            synthetic.generate_example(domain, split, i, seed=seed, height=height, width=width)
            for i in range(n)
        ]
        rows.append([image for image, _ in pairs])
        rows.append([labels.colorize(label) for _, label in pairs])
    grid = np.full((4 * height + 3 * gap, n * width + (n - 1) * gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y, x = r * (height + gap), c * (width + gap)
            grid[y : y + height, x : x + width] = tile
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="/tmp/synthetic_preview.png")
    parser.add_argument("--num", type=int, default=4, help="scenes per domain")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=synthetic.SPLITS)
    args = parser.parse_args()
    grid = preview_grid(args.num, args.height, args.width, args.seed, args.split)
    Image.fromarray(grid).save(args.out)
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main()
