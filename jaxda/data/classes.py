"""Class sets: the names and colours of a label space (Cityscapes' 19 train ids by default).

A dataset prepared from the user's own folders may carry its own class set, read from a
`classes.json` file:

  {"names": ["background", "road", "car"],          # class i = train id i (at most 255)
   "colors": [[0, 0, 0], [128, 64, 128], [0, 0, 142]],  # RGB, one per class, all different
   "ignore_id": 255,                                 # optional: the id meaning 'not labelled'
                                                     #   in integer label files (default 255)
   "ignore_colors": [[255, 255, 255]]}               # optional: colours meaning 'not labelled'
                                                     #   in colour label files

Stored labels always use 255 for ignore. The prepared dataset keeps the class set beside its
files (`CLASSES_FILE`), and a run's config carries the resolved names and colours
(`config.class_names`, `config.class_colors`; empty = Cityscapes), so evaluation tables,
prepare summaries and prediction colours follow the dataset.
"""

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from jaxda.data import labels as labels_lib

CLASSES_FILE = "jaxda_classes.json"  # The class set of a prepared dataset, in its folder.
MAX_CLASSES = 255  # Train ids 0..254; 255 is ignore.


class ClassFileError(ValueError):
    """A classes.json file that cannot be used; the message names the file and the entry."""


@dataclasses.dataclass(frozen=True)
class ClassSet:
    """Names and RGB colours of classes 0..C-1, and how unlabelled pixels are written."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_id: int = labels_lib.IGNORE_LABEL
    ignore_colors: tuple[tuple[int, int, int], ...] = ()
    source: str = "cityscapes"  # Where it came from ('cityscapes' or a file path), for messages.

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def is_cityscapes(self) -> bool:
        return self.names == labels_lib.CITYSCAPES_CLASSES and self.colors == _CITYSCAPES_COLORS

    def palette(self) -> np.ndarray:
        """[256, 3] uint8: class i -> its colour; every other id (ignore) -> black."""
        palette = np.zeros((256, 3), np.uint8)
        palette[: self.num_classes] = np.asarray(self.colors, np.uint8).reshape(-1, 3)
        return palette

    def colorize(self, ids: np.ndarray) -> np.ndarray:
        """[..., H, W] class ids -> [..., H, W, 3] uint8 colours (ignore -> black)."""
        return self.palette()[np.asarray(ids)]

    def to_json(self) -> dict:
        return {
            "names": list(self.names),
            "colors": [list(c) for c in self.colors],
            "ignore_id": self.ignore_id,
            "ignore_colors": [list(c) for c in self.ignore_colors],
        }

    def same_classes(self, other: "ClassSet") -> bool:
        """Whether two sets name the same classes in the same order with the same colours."""
        return self.names == other.names and self.colors == other.colors


_CITYSCAPES_COLORS = tuple(tuple(int(v) for v in c) for c in labels_lib.CITYSCAPES_PALETTE)
CITYSCAPES = ClassSet(labels_lib.CITYSCAPES_CLASSES, _CITYSCAPES_COLORS)


def _color(value, path: str, where: str) -> tuple[int, int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 3
        or not all(isinstance(v, int) and 0 <= v <= 255 for v in value)
    ):
        raise ClassFileError(f"{path}: {where} is {value!r}; a colour is [R, G, B] with 0..255")
    return tuple(int(v) for v in value)


def from_json(data: dict, path: str) -> ClassSet:
    """A ClassSet from the parsed contents of a classes.json file (`path` for messages)."""
    if not isinstance(data, dict):
        raise ClassFileError(f"{path}: expected a JSON object with 'names' and 'colors'")
    unknown = sorted(set(data) - {"names", "colors", "ignore_id", "ignore_colors"})
    if unknown:
        raise ClassFileError(
            f"{path}: unknown keys {unknown}; known: names, colors, ignore_id, ignore_colors"
        )
    names, colors = data.get("names"), data.get("colors")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ClassFileError(f"{path}: 'names' must be a non-empty list of class names")
    if len(names) > MAX_CLASSES:
        raise ClassFileError(f"{path}: {len(names)} classes; at most {MAX_CLASSES} are supported")
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ClassFileError(f"{path}: duplicate class names {duplicates}")
    if not isinstance(colors, list) or len(colors) != len(names):
        raise ClassFileError(
            f"{path}: 'colors' must list one [R, G, B] per class ({len(names)} names, "
            f"{len(colors) if isinstance(colors, list) else 'no'} colours)"
        )
    colors = tuple(_color(c, path, f"colors[{i}] ({names[i]})") for i, c in enumerate(colors))
    ignore_colors = tuple(
        _color(c, path, f"ignore_colors[{i}]") for i, c in enumerate(data.get("ignore_colors", []))
    )
    seen: dict[tuple[int, int, int], str] = {}
    for name, color in [*zip(names, colors, strict=True), *(("ignore", c) for c in ignore_colors)]:
        if color in seen:
            raise ClassFileError(
                f"{path}: colour {list(color)} is given to both {seen[color]!r} and {name!r}; "
                "each class needs its own colour (colour label files are decoded by it)"
            )
        seen[color] = name
    ignore_id = data.get("ignore_id", labels_lib.IGNORE_LABEL)
    if isinstance(ignore_id, bool) or not isinstance(ignore_id, int) or not 0 <= ignore_id < 2**16:
        raise ClassFileError(f"{path}: ignore_id {ignore_id!r} must be an integer in 0..65535")
    if ignore_id < len(names):
        raise ClassFileError(
            f"{path}: ignore_id {ignore_id} is also class {names[ignore_id]!r}; use an id >= "
            f"{len(names)} (e.g. 255)"
        )
    return ClassSet(tuple(names), colors, int(ignore_id), ignore_colors, source=path)


def load(path: str, flag: str = "classes") -> ClassSet:
    """Reads a classes.json file; errors name `flag` (the option that gave the path)."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ClassFileError(f"--{flag}={path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClassFileError(f"--{flag}={path}: not a readable JSON file ({e})") from None
    return from_json(data, path)


def save(class_set: ClassSet, path: str) -> None:
    """Writes `class_set` as a classes.json file (atomically)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(class_set.to_json(), f, indent=1)
    os.replace(tmp, path)


def of_dataset_dir(dataset_dir: str) -> ClassSet:
    """The class set stored with a prepared dataset (Cityscapes when it stores none)."""
    path = os.path.join(dataset_dir, CLASSES_FILE)
    if not os.path.exists(path):
        return CITYSCAPES
    with open(path) as f:
        return from_json(json.load(f), path)


def from_config(config) -> ClassSet:
    """The class set of a run's config: config.class_names / class_colors, else Cityscapes."""
    names = tuple(config.get("class_names") or ())
    if not names:
        return CITYSCAPES
    colors = tuple(tuple(int(v) for v in c) for c in config.get("class_colors") or ())
    if len(colors) != len(names):
        raise ValueError(
            f"config.class_colors has {len(colors)} colours for {len(names)} class_names"
        )
    return ClassSet(names, colors, source="config.class_names")


def names_for(config, class_ids: Sequence[int] | None = None) -> list[str]:
    """Names of `class_ids` (all classes when None) under the config's class set."""
    names = from_config(config).names
    return list(names) if class_ids is None else [names[c] for c in class_ids]


def _streams(config) -> list[tuple[str, object]]:
    """(config path, stream) of every dataset stream a run reads: data.* and eval.datasets.*."""
    found = [
        (f"config.data.{key}", stream)
        for key, stream in (config.get("data") or {}).items()
        if hasattr(stream, "get") and stream.get("name")
    ]
    datasets = (config.get("eval") or {}).get("datasets") or {}
    found += [(f"config.eval.datasets.{key}", stream) for key, stream in datasets.items()]
    return found


def _dataset_class_set(name: str, data_dir: str, missing_ok: bool) -> ClassSet | None:
    """The class set stored with a prepared dataset; Cityscapes for the built-in and downloaded
    datasets (they store none); None for an unprepared one when `missing_ok`."""
    if not name.startswith("folder/"):
        return CITYSCAPES
    from jaxda.data import sources  # Here: sources imports the builders, which import this.

    try:
        builder = sources.get_builder(name, data_dir or None)
    except sources.DatasetNotPreparedError:
        if missing_ok:
            return None
        raise
    return of_dataset_dir(str(builder.data_dir))


def resolve(config, missing_ok: bool = False, fallback: dict | None = None):
    """`config` with num_classes, class_names and class_colors following its datasets.

    Every stream's dataset must carry the same class set (a folder dataset prepared with
    `--classes`, else Cityscapes' 19). config.num_classes = 0 takes the set's size; any other
    value must equal it. With `missing_ok`, unprepared datasets are skipped (prediction needs
    no dataset) and, when none is prepared, `fallback` (a saved config's dict) gives the names.
    Returns a copy; raises ValueError naming the disagreeing datasets and their class files.
    """
    import ml_collections

    found: list[tuple[str, str, ClassSet]] = []
    data_dir = (config.get("data") or {}).get("data_dir", "")
    for where, stream in _streams(config):
        # Extra evaluation datasets are optional (skipped in --mode=eval when unprepared).
        optional = missing_ok or where.startswith("config.eval.datasets")
        class_set = _dataset_class_set(stream.name, data_dir, optional)
        if class_set is None:
            continue
        for other_where, other_name, other in found:
            if not class_set.same_classes(other):
                raise ValueError(
                    f"{where} ({stream.name!r}, classes from {class_set.source}: "
                    f"{list(class_set.names)}) and {other_where} ({other_name!r}, classes from "
                    f"{other.source}: {list(other.names)}) have different class sets; prepare "
                    "them with the same --classes file"
                )
        found.append((where, stream.name, class_set))
    explicit = tuple(config.get("class_names") or ())
    if found:
        class_set = found[0][2]
        if explicit and explicit != class_set.names:
            raise ValueError(
                f"config.class_names {list(explicit)} differ from the classes of the datasets "
                f"({found[0][1]!r}: {list(class_set.names)}); leave config.class_names empty"
            )
    elif explicit:
        class_set = from_config(config)
    elif fallback and fallback.get("class_names"):
        class_set = from_config(ml_collections.ConfigDict(fallback))
    else:
        class_set = CITYSCAPES
    num_classes = config.get("num_classes", 0)
    if num_classes not in (0, class_set.num_classes):
        where = f" ({found[0][1]!r}, classes from {class_set.source})" if found else ""
        raise ValueError(
            f"config.num_classes={num_classes}, but the class set of the datasets{where} has "
            f"{class_set.num_classes} classes; set --config.num_classes={class_set.num_classes} "
            "(or 0: follow the datasets)"
        )
    result = ml_collections.ConfigDict(config.to_dict())
    with result.unlocked():
        result.num_classes = class_set.num_classes
        result.class_names = tuple(class_set.names)
        result.class_colors = tuple(tuple(c) for c in class_set.colors)
    return result
