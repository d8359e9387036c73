r"""Images/s of the GTA5 source pipeline on full-size PNGs, with 1 core and with all cores.

  python benchmarks/gta5_pipeline_throughput.py [--images=24] [--batch_size=2] [--epochs=2]

Writes `--images` GTA5-style pairs at 1914x1052 (RGB images rendered by the synthetic
generator in its textured "real" style, so that they compress like photographs; palette
labels holding Cityscapes label ids), prepares them with `launch.prepare`'s builder, then
times the training pipeline of the published config (decode, bicubic resize to 1280x720,
BGR - mean, batch) in a child process pinned with `taskset` to 1 core and to all cores.
The first pass over the data is warm-up and not timed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from PIL import Image

GTA5_SIZE = (1052, 1914)  # (height, width) of most GTA5 frames.


def write_gta5(root: str, count: int) -> None:
    from jaxda.data import labels, synthetic

    os.makedirs(f"{root}/images"), os.makedirs(f"{root}/labels")
    for index in range(count):
        image, train_ids = synthetic.generate_example(
            "target", "train", index, seed=0, height=GTA5_SIZE[0], width=GTA5_SIZE[1]
        )
        Image.fromarray(image).save(f"{root}/images/{index + 1:05d}.png")
        label = Image.fromarray(labels.train_ids_to_label_ids(train_ids)).convert("P")
        label.save(f"{root}/labels/{index + 1:05d}.png")


def measure(data_dir: str, batch_size: int, epochs: int) -> dict:
    """Runs in the pinned child: images/s of the published GTA5 source stream."""
    from configs import source_only
    from jaxda.data import input_pipeline

    config = source_only.get_config()
    config.data.data_dir = data_dir
    reader = input_pipeline.open_reader(config.data.source, config.data)
    stream = input_pipeline.train_iterator(
        reader, config.data.source, config.data, global_batch_size=batch_size, seed=(0, 0), start=0
    )
    per_epoch = len(reader) // batch_size
    for _ in range(per_epoch):  # Warm-up: graph tracing, thread pools, file cache.
        next(stream)
    start = time.perf_counter()
    for _ in range(per_epoch * epochs):
        batch = next(stream)
    seconds = time.perf_counter() - start
    assert batch["image"].shape == (batch_size, 720, 1280, 3), batch["image"].shape
    return {"images": per_epoch * epochs * batch_size, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--measure_in", help=argparse.SUPPRESS)  # Child mode: a data_dir.
    args = parser.parse_args()
    if args.measure_in:
        print(json.dumps(measure(args.measure_in, args.batch_size, args.epochs)))
        return

    from jaxda.data import prepare

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_gta5(f"{tmp}/gta5", args.images)
        prepare.prepare("gta5", f"{tmp}/gta5", f"{tmp}/tfds")
        size_mb = sum(
            os.path.getsize(f"{tmp}/gta5/images/{f}") for f in os.listdir(f"{tmp}/gta5/images")
        ) / (args.images * 2**20)
        print(f"wrote and prepared {args.images} pairs ({size_mb:.1f} MB per image) "
              f"in {time.perf_counter() - start:.0f}s")  # fmt: skip
        rows = []
        for label, cpu_list in (("1 core", "0"), (f"{cores} cores", f"0-{cores - 1}")):
            child = [
                "taskset", "-c", cpu_list, sys.executable, __file__,
                f"--measure_in={tmp}/tfds", f"--batch_size={args.batch_size}",
                f"--epochs={args.epochs}",
            ]  # fmt: skip
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rate = result["images"] / result["seconds"]
            used = 1 if cpu_list == "0" else cores
            rows.append((label, rate, rate / used))
    print("\nGTA5 source pipeline (PNG decode, bicubic resize to 1280x720, BGR - mean, batch):\n")
    print("| cores | images/s | images/s per core |")
    print("|---|---|---|")
    for label, rate, per_core in rows:
        print(f"| {label} | {rate:.1f} | {per_core:.1f} |")


if __name__ == "__main__":
    main()
