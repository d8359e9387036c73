"""Named subsets of a prepared split: id lists bundled with jaxda, selected by `domain(subset=)`.

A list entry is '<raw split>_<image id>', e.g. 'train_aachen_000010_000019': the Cityscapes
raw split ('train' or 'val', the `leftImg8bit/<split>/` folder) and the id the builder stores as
the example's 'image_id' (`<city>_<seq>_<frame>`).

Bundled lists (jaxda/data/splits/, installed as package data):
  cityscapes_group{0,1}_{train,val}: Adversarial_DA_Exp's "Group0 -> Group1" city shift
  (docs/methods/adversarial_da_exp.md), all drawn from the Cityscapes *train* split: group 0
  = aachen, bremen, darmstadt, erfurt, hanover, krefeld, strasbourg, tubingen, weimar; group 1
  = bochum, cologne, dusseldorf, hamburg, jena, monchengladbach, stuttgart, ulm, zurich.
  train0 1,532, train1 1,246, val0 / val1 90 (10 per city, disjoint from the train lists).
  cityscapes_dasac_val2: DA-SAC's in-training validation list (its data/val2_cityscapes.txt),
  500 images of the Cityscapes *train* split, which DA-SAC also adapts on (unlabelled), so a
  checkpoint selected on it is selected on training images (docs/methods/dasac.md).
  gta5_robustnet_{train,val,test}, synthia_robustnet_{train,val}: RobustNet's own random
  splits (its split_data/ lists) of GTA5 (12,388 / 6,382 / 6,181 images) and SYNTHIA-RAND-
  CITYSCAPES (6,580 / 2,820), over the one 'train' split jaxda prepares of each; entries are
  'train_<image id>' (GTA5 '00022', SYNTHIA '0000003').
"""

import functools
import re
from importlib import resources

# Subset name -> file under jaxda/data/splits/.
BUNDLED = {
    "cityscapes_group0_train": "cityscapes_city_groups/train0.txt",
    "cityscapes_group0_val": "cityscapes_city_groups/val0.txt",
    "cityscapes_group1_train": "cityscapes_city_groups/train1.txt",
    "cityscapes_group1_val": "cityscapes_city_groups/val1.txt",
    "cityscapes_dasac_val2": "dasac/val2.txt",
    **{f"gta5_robustnet_{s}": f"robustnet/gta5_{s}.txt" for s in ("train", "val", "test")},
    **{f"synthia_robustnet_{s}": f"robustnet/synthia_{s}.txt" for s in ("train", "val")},
}
# Raw split prefix of a list entry -> the TFDS split the builders store it in.
RAW_SPLITS = {"train": "train", "val": "validation"}
_ENTRY = re.compile(r"(train|val)_(\S+)")


class SubsetError(ValueError):
    """A subset list that does not fit the prepared split it is applied to."""


@functools.cache
def load(name: str) -> tuple[str, ...]:
    """The entries of bundled list `name`, in file order (e.g. 'train_aachen_000010_000019')."""
    if name not in BUNDLED:
        raise SubsetError(f"Unknown subset {name!r}; bundled: {sorted(BUNDLED)}")
    text = resources.files("jaxda.data").joinpath("splits", BUNDLED[name]).read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def image_ids(name: str, split: str) -> tuple[str, ...]:
    """The image ids of list `name`, checked to belong to the TFDS `split` the stream reads."""
    ids = []
    for entry in load(name):
        match = _ENTRY.fullmatch(entry)
        if not match:
            raise SubsetError(f"Subset {name!r}: malformed entry {entry!r} (want 'train_<id>')")
        if RAW_SPLITS[match.group(1)] != split:
            raise SubsetError(
                f"Subset {name!r} lists {entry!r} of the {RAW_SPLITS[match.group(1)]!r} split, "
                f"but the stream reads split {split!r}; set the stream's split to match."
            )
        ids.append(match.group(2))
    return tuple(ids)


def select(name: str, split: str, stored_ids) -> list[int]:
    """Indices of the split's examples listed by `name`, in split order.

    Args:
      stored_ids: [len(split)] the 'image_id' of every example of the prepared split.

    Raises:
      SubsetError: naming the list and a few of its ids the prepared split lacks (a partial
        or different dataset would otherwise train on a silently smaller set).
    """
    wanted = set(image_ids(name, split))
    stored = [i.decode() if isinstance(i, bytes) else str(i) for i in stored_ids]
    missing = wanted.difference(stored)
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise SubsetError(
            f"Subset {name!r}: {len(missing)} of its {len(wanted)} ids are not in the prepared "
            f"split {split!r} ({len(stored)} examples), e.g. {shown}. Prepare the full dataset "
            "(python -m launch.prepare) or clear the stream's subset."
        )
    return [index for index, image_id in enumerate(stored) if image_id in wanted]
