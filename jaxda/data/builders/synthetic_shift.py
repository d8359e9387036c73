"""TFDS builder of the built-in synthetic domain-shift benchmark (no download needed).

Configs name the resolution ('64x128', '128x256', '256x512'; 'tiny' is 32x64 with a few
examples, for tests); splits are `source_train`, `source_validation`, `target_train` and
`target_validation`. Labels are
Cityscapes train ids. The content is fixed by `GENERATOR_SEED`: the benchmark is one dataset,
whatever training seed is used on it.
"""

import dataclasses

import tensorflow_datasets as tfds

from jaxda.data import synthetic

GENERATOR_SEED = 0
SPLITS = ("source_train", "source_validation", "target_train", "target_validation")


@dataclasses.dataclass
class SyntheticShiftConfig(tfds.core.BuilderConfig):
    height: int = 128
    width: int = 256
    num_train: int = 2000  # Per domain.
    num_validation: int = 500  # Target; the source validation split has a fifth of it.

    def split_size(self, split_name: str) -> int:
        if split_name == "source_validation":
            return max(1, self.num_validation // 5)
        return self.num_train if split_name.endswith("train") else self.num_validation


class SyntheticShift(tfds.core.GeneratorBasedBuilder):
    """Procedural 'game' (source) and 'real' (target) street scenes in Cityscapes train ids."""

    VERSION = tfds.core.Version(synthetic.GENERATOR_VERSION)
    BUILDER_CONFIGS = [
        SyntheticShiftConfig(name=f"{h}x{w}", height=h, width=w)
        for h, w in ((64, 128), (128, 256), (256, 512))
    ] + [SyntheticShiftConfig(name="tiny", height=32, width=64, num_train=32, num_validation=16)]

    def _info(self) -> tfds.core.DatasetInfo:
        h, w = self.builder_config.height, self.builder_config.width
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(h, w, 3), encoding_format="png"),
                    "label": tfds.features.Image(shape=(h, w, 1), encoding_format="png"),
                    "image_id": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {name: self._generate_examples(name) for name in SPLITS}

    def _generate_examples(self, split_name: str):
        domain, split = split_name.split("_")
        cfg = self.builder_config
        for index in range(cfg.split_size(split_name)):
            image, label = synthetic.generate_example(
                domain, split, index, seed=GENERATOR_SEED, height=cfg.height, width=cfg.width
            )
            yield (
                index,
                {
                    "image": image,
                    "label": label[..., None],
                    "image_id": f"{split_name}_{index:05d}",
                },
            )
