"""Random-access readers over prepared TFDS datasets (ArrayRecord files).

Every dataset, built-in or downloaded, is read the same way: `tfds.builder(name)` +
`as_data_source(split)` with the image and label left as encoded PNG bytes, so that decoding
happens in the tf.data graph (in parallel, outside the GIL) and any example can be fetched by
index. Random access is what makes the training order a pure function of (seed, position) and
therefore resumable exactly (see `input_pipeline`).
"""

import json
import os
import socket
import struct
from collections.abc import Sequence

import jax
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from jaxda.data import subsets
from jaxda.data.builders import (  # noqa: F401  (importing registers the builders)
    bdd100k,
    cityscapes,
    folder,
    gta5,
    mapillary,
    synthetic_shift,
    synthia,
)

# Datasets jaxda builds by itself (no download): built on first use.
BUILT_IN = ("synthetic_shift",)

# Datasets built from downloaded files by `python -m launch.prepare`: TFDS name -> builder.
DOWNLOADED = {
    builder.name: builder
    for builder in (
        gta5.Gta5,
        synthia.SynthiaRandCityscapes,
        cityscapes.CityscapesFine,
        bdd100k.Bdd100k,
        mapillary.Mapillary,
    )
}
# The TFDS catalog's own `cityscapes` stores raw label ids; jaxda's `cityscapes_fine` replaces it.
_REPLACED = {"cityscapes": cityscapes.CityscapesFine}


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset a config names has not been built into `data_dir`."""


def default_data_dir(data_dir: str | None) -> str:
    """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _not_prepared_message(name: str, data_dir: str) -> str:
    base = name.split("/", maxsplit=1)[0]
    if base == folder.FolderBuilder.name:
        config = name.partition("/")[2] or "NAME"
        prepared = _prepared_folder_datasets(data_dir)
        return (
            f"Dataset {name!r} is not prepared in data_dir={data_dir!r}. Build it from your "
            f"image folder with: python -m launch.prepare --dataset=folder --name={config} "
            f"--manual_dir=DIR --images=GLOB [--labels=PATTERN --label_format=FORMAT "
            f"--classes=classes.json] --data_dir={data_dir} (flags: jaxda/data/builders/"
            f"folder.py). Folder datasets prepared there: {', '.join(prepared) or 'none'}."
        )
    builder = DOWNLOADED.get(base) or _REPLACED.get(base)
    if builder is None:
        how = (
            "Check the dataset name in config.data (a TFDS name such as 'synthetic_shift/64x128')."
        )
    else:
        how = (
            f"Download {builder.DOWNLOAD}, then build it with: python -m launch.prepare "
            f"--dataset={builder.PREPARE_NAME} --manual_dir=DIR --data_dir={data_dir} "
            f"(DIR holds {builder.EXPECTED})."
        )
        if base != builder.name:
            how += (
                f" jaxda reads it as {builder.name!r} (labels stored as train ids), not as the "
                f"TFDS catalog's {base!r}: name {builder.name!r} in config.data (no label_map)."
            )
    return (
        f"Dataset {name!r} is not prepared in data_dir={data_dir!r}. {how} "
        "The built-in synthetic benchmark needs no download: "
        "python -m launch.main --config=configs/adaptseg.py:synthetic --workdir=DIR"
    )


def _prepared_folder_datasets(data_dir: str) -> list[str]:
    """The names of the folder datasets prepared in `data_dir` ('folder/NAME')."""
    root = os.path.join(data_dir, folder.FolderBuilder.name)
    version = str(folder.FolderBuilder.VERSION)
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    return [
        f"folder/{n}"
        for n in names
        if os.path.exists(os.path.join(root, n, version, "dataset_info.json"))
    ]


def get_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The prepared builder for `name`; built-in datasets are generated on first use.

    'folder/NAME' (the user's own folders, `launch.prepare --dataset=folder`) is read from its
    files (`tfds.builder_from_directory`): its builder class holds no options to rebuild it.
    """
    data_dir = default_data_dir(data_dir)
    if name.split("/", maxsplit=1)[0] == folder.FolderBuilder.name:
        if name not in _prepared_folder_datasets(data_dir):
            raise DatasetNotPreparedError(_not_prepared_message(name, data_dir))
        version = str(folder.FolderBuilder.VERSION)
        return tfds.builder_from_directory(os.path.join(data_dir, name, version))
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetNotPreparedError(_not_prepared_message(name, data_dir)) from None
    built_in = name.split("/", maxsplit=1)[0] in BUILT_IN
    if not builder.is_prepared():
        if not built_in:
            raise DatasetNotPreparedError(_not_prepared_message(name, data_dir))
        # One process generates; the others wait for it below instead of writing the same
        # files at once.
        if jax.process_index() == 0:
            logging.info("Generating the built-in dataset %s into %s (once).", name, data_dir)
            builder.download_and_prepare()
    if built_in and jax.process_count() > 1:
        # Every process passes here for every built-in dataset it opens, prepared or not, so
        # the barrier counts agree even if processes saw the files at different moments.
        multihost_utils.sync_global_devices(f"jaxda: built-in dataset {name} ready")
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            raise DatasetNotPreparedError(
                f"Process 0 generated {name!r} into data_dir={data_dir!r}, which process "
                f"{jax.process_index()} does not see there: put data_dir on storage every host "
                "shares, or copy the prepared dataset to the same path on every host."
            )
    return builder


class SplitReader(Sequence):
    """Encoded examples of one split: `reader[i]` -> {'image': png bytes, 'label': png bytes}.

    `subset`: a bundled id list (`jaxda.data.subsets`); the reader then holds only the listed
    examples, in split order, and fails if the prepared split lacks any of them.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
        subset: str = "",
    ):
        builder = get_builder(name, data_dir)
        if split not in builder.info.splits:
            raise ValueError(
                f"Dataset {name!r} has no split {split!r}; available: {sorted(builder.info.splits)}"
            )
        features = builder.info.features
        for key in (image_key, label_key):
            if key not in features:
                raise ValueError(
                    f"Dataset {name!r} has no feature {key!r} (config.data image_key/label_key); "
                    f"features: {sorted(features.keys())}"
                )
        self.name, self.split = name, split
        self.image_key, self.label_key = image_key, label_key
        skip = tfds.decode.SkipDecoding()
        self._source = builder.as_data_source(split, decoders={image_key: skip, label_key: skip})
        self.subset = subset
        self._indices = None
        if subset:
            if "image_id" not in features:
                raise ValueError(
                    f"Dataset {name!r} stores no 'image_id'; subset={subset!r} needs it"
                )
            self._indices = subsets.select(subset, split, self._image_ids(builder, split))

    def _image_ids(self, builder, split: str) -> list[str]:
        """Every example's 'image_id', in split order, cached beside the prepared dataset: the
        ids are stored with the images, so the first listing reads every record once."""
        path = os.path.join(builder.data_dir, f"image_ids-{split}.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        ids = [self._source[i]["image_id"] for i in range(len(self._source))]
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
        # Host and pid: processes on several hosts may share the directory, and pids repeat.
        tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(ids, f)
        os.replace(tmp, path)  # Atomic: concurrent processes write the same list.
        return ids

    def __len__(self) -> int:
        return len(self._source) if self._indices is None else len(self._indices)

    def __getitem__(self, index: int) -> dict[str, bytes]:
        if self._indices is not None:
            index = self._indices[index]
        example = self._source[int(index)]
        return {"image": example[self.image_key], "label": example[self.label_key]}


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(png: bytes) -> tuple[int, int]:
    """(height, width) of a PNG, read from its IHDR chunk (bytes 16-24) without decoding."""
    if png[:8] != _PNG_SIGNATURE or png[12:16] != b"IHDR":
        raise ValueError("Expected PNG bytes (evaluation reads image sizes from PNG headers)")
    width, height = struct.unpack(">II", png[16:24])
    return height, width
