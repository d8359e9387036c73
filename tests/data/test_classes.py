"""Class sets: classes.json validation, colours, and a run's class set following its datasets."""

import json

import ml_collections
import numpy as np
import pytest

from jaxda.data import classes, labels

FIVE = {
    "names": ["background", "road", "car", "person", "sky"],
    "colors": [[0, 0, 0], [128, 64, 128], [0, 0, 142], [220, 20, 60], [70, 130, 180]],
    "ignore_id": 250,
    "ignore_colors": [[255, 255, 255]],
}


def write(tmp_path, data, name="classes.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_class_file_round_trip_and_colours(tmp_path):
    class_set = classes.load(write(tmp_path, FIVE))
    assert class_set.num_classes == 5 and class_set.ignore_id == 250
    assert class_set.ignore_colors == ((255, 255, 255),)
    assert not class_set.is_cityscapes and classes.CITYSCAPES.is_cityscapes
    ids = np.array([[0, 1, 2], [3, 4, 255]], np.uint8)
    expected = np.array([FIVE["colors"][i] if i < 5 else (0, 0, 0) for i in ids.ravel()])
    np.testing.assert_array_equal(class_set.colorize(ids), expected.reshape(2, 3, 3))
    classes.save(class_set, str(tmp_path / "copy.json"))
    assert classes.load(str(tmp_path / "copy.json")).same_classes(class_set)
    # Cityscapes: the official palette by train id.
    np.testing.assert_array_equal(
        classes.CITYSCAPES.colorize(np.arange(19)), labels.CITYSCAPES_PALETTE
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colors": [[0, 0, 0], [0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]]}, "colour [0, 0, 0]"),
        ({"ignore_colors": [[0, 0, 142]]}, "both 'car' and 'ignore'"),
        ({"colors": [[0, 0, 0]]}, "one [R, G, B] per class"),
        ({"names": ["a", "a", "b", "c", "d"]}, "duplicate class names ['a']"),
        ({"ignore_id": 3}, "ignore_id 3 is also class 'person'"),
        ({"colors": [[0, 0, 0], [1, 2], [1, 1, 1], [2, 2, 2], [3, 3, 3]]}, "colors[1] (road)"),
        ({"palette": []}, "unknown keys ['palette']"),
    ],
)
def test_bad_class_files_name_the_file_and_entry(tmp_path, change, message):
    path = write(tmp_path, {**FIVE, **change})
    with pytest.raises(classes.ClassFileError) as error:
        classes.load(path)
    assert path in str(error.value) and message in str(error.value)


def test_missing_or_broken_class_file_names_the_flag(tmp_path):
    with pytest.raises(classes.ClassFileError, match=r"--classes=.*nope.json: no such file"):
        classes.load(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(classes.ClassFileError, match=r"--classes=.*bad.json: not a readable JSON"):
        classes.load(str(tmp_path / "bad.json"))


def _config(num_classes=19, **streams):
    config = ml_collections.ConfigDict(
        {
            "num_classes": num_classes,
            "class_names": (),
            "class_colors": (),
            "data": {"data_dir": ""},
            "eval": {"datasets": {}},
        }
    )
    for key, name in streams.items():
        config.data[key] = {"name": name, "split": "train"}
    return config


def test_resolve_keeps_cityscapes_for_the_built_in_datasets():
    config = classes.resolve(_config(source="gta5", target="cityscapes_fine"))
    assert config.num_classes == 19
    assert config.class_names == labels.CITYSCAPES_CLASSES
    assert classes.from_config(config).is_cityscapes
    with pytest.raises(ValueError, match=r"config.num_classes=5, but .* has 19 classes"):
        classes.resolve(_config(num_classes=5, source="gta5"))
    assert classes.resolve(_config(num_classes=0, source="gta5")).num_classes == 19
