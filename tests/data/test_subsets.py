"""Bundled id lists (Adversarial_DA_Exp's Cityscapes city groups) and subset readers."""

import re

import numpy as np
import pytest

from jaxda.data import prepare, sources, subsets
from tests.data.test_builders import png_bytes, random_image, write

GROUPS = {0: "cityscapes_group0", 1: "cityscapes_group1"}
_ID = re.compile(r"train_([a-z]+)_(\d{6})_(\d{6})")


def _city(entry: str) -> str:
    return _ID.fullmatch(entry).group(1)


def test_bundled_city_groups():
    lists = {name: subsets.load(name) for name in subsets.BUNDLED if "group" in name}
    counts = {name: len(ids) for name, ids in lists.items()}
    assert counts == {
        "cityscapes_group0_train": 1532,
        "cityscapes_group1_train": 1246,
        "cityscapes_group0_val": 90,
        "cityscapes_group1_val": 90,
    }
    for name, ids in lists.items():
        assert all(_ID.fullmatch(i) for i in ids), name  # Cityscapes train ids only.
        assert len(set(ids)) == len(ids), name
    cities = {g: {_city(i) for i in lists[f"{p}_train"]} for g, p in GROUPS.items()}
    assert len(cities[0]) == len(cities[1]) == 9 and not cities[0] & cities[1]
    for g, prefix in GROUPS.items():
        train, val = set(lists[f"{prefix}_train"]), lists[f"{prefix}_val"]
        # Held-out validation: 10 images of each of the group's cities, none trained on.
        assert not train.intersection(val)
        assert {_city(i) for i in val} == cities[g]
        assert all(np.unique([_city(i) for i in val], return_counts=True)[1] == 10)
    # Both groups' images, train and val, are 2,958 distinct images of the 2,975 in train.
    assert len(set().union(*lists.values())) == 2958
    assert subsets.image_ids("cityscapes_group0_val", "train")[0] == "aachen_000000_000019"
    with pytest.raises(subsets.SubsetError, match="split 'validation'"):
        subsets.image_ids("cityscapes_group0_val", "validation")


def test_bundled_dasac_val2():
    """DA-SAC's val2: 500 distinct images of the Cityscapes train split, from 18 cities."""
    ids = subsets.load("cityscapes_dasac_val2")
    assert len(ids) == len(set(ids)) == 500
    assert all(_ID.fullmatch(i) for i in ids)
    assert len({_city(i) for i in ids}) == 18
    assert subsets.image_ids("cityscapes_dasac_val2", "train")[0] == "aachen_000000_000019"


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    """Cityscapes folders with 2 images of each group's train list, 1 of group 1's val list
    and 1 listed nowhere (train split), prepared; returns (data_dir, {id: image png})."""
    root = tmp_path_factory.mktemp("groups")
    rng = np.random.default_rng(0)
    ids = [
        *subsets.load("cityscapes_group0_train")[:2],
        *subsets.load("cityscapes_group1_train")[-2:],
        subsets.load("cityscapes_group1_val")[0],
        "train_aachen_000999_000019",
    ]
    images = {}
    for entry in ids:
        stem = entry.removeprefix("train_")
        city = _city(entry)
        images[stem] = png_bytes(random_image(rng, 8, 16))
        write(f"{root}/cs/leftImg8bit/train/{city}/{stem}_leftImg8bit.png", images[stem])
        label = png_bytes(rng.integers(0, 34, (8, 16)).astype(np.uint8))
        write(f"{root}/cs/gtFine/train/{city}/{stem}_gtFine_labelIds.png", label)
    # The builder needs a non-empty validation split.
    val = "frankfurt/frankfurt_000000_000294"
    write(f"{root}/cs/leftImg8bit/val/{val}_leftImg8bit.png", png_bytes(random_image(rng, 8, 16)))
    label = png_bytes(np.zeros((8, 16), np.uint8))
    write(f"{root}/cs/gtFine/val/{val}_gtFine_labelIds.png", label)
    data_dir = str(root / "tfds")
    prepare.prepare("cityscapes", str(root / "cs"), data_dir)
    return data_dir, images


def test_subset_reader_keeps_exactly_the_listed_examples(cityscapes, monkeypatch):
    data_dir, images = cityscapes
    listed = sorted(images)[:3]
    monkeypatch.setattr(subsets, "load", lambda name: tuple(f"train_{i}" for i in listed))
    full = sources.SplitReader("cityscapes_fine", "train", data_dir)
    reader = sources.SplitReader("cityscapes_fine", "train", data_dir, subset="tiny")
    assert len(full) == 6 and len(reader) == 3
    assert sorted(reader[i]["image"] for i in range(3)) == sorted(images[i] for i in listed)
    with pytest.raises(IndexError):
        reader[3]


def test_a_listed_id_missing_from_the_split_fails_clearly(cityscapes):
    data_dir, _ = cityscapes
    missing = subsets.load("cityscapes_group0_train")[2].removeprefix("train_")
    with pytest.raises(subsets.SubsetError) as error:
        sources.SplitReader("cityscapes_fine", "train", data_dir, subset="cityscapes_group0_train")
    message = str(error.value)
    assert "'cityscapes_group0_train': 1530 of its 1532 ids" in message and missing in message
