"""Model constructors from config blocks."""

import ml_collections

from jaxda.models import deeplab_v2, discriminators, resnet

_SEGMENTERS = {"deeplab_v2": deeplab_v2.DeepLabV2}


def build_segmenter(model_config: ml_collections.ConfigDict, num_classes: int):
    """Builds the segmentation network named by `model_config.name` ('deeplab_v2')."""
    if model_config.name not in _SEGMENTERS:
        raise ValueError(
            f"Unknown model name {model_config.name!r} (config.model.name); "
            f"available: {sorted(_SEGMENTERS)}"
        )
    stage_sizes = model_config.stage_sizes
    if stage_sizes is None:
        if model_config.depth not in resnet.STAGE_SIZES:
            raise ValueError(
                f"config.model.depth={model_config.depth} is not one of "
                f"{sorted(resnet.STAGE_SIZES)}; set config.model.stage_sizes for another depth"
            )
        stage_sizes = resnet.STAGE_SIZES[model_config.depth]
    return _SEGMENTERS[model_config.name](
        num_classes=num_classes,
        stage_sizes=tuple(stage_sizes),
        width=model_config.width,
        aspp_dilations=tuple(model_config.aspp_dilations),
        num_aspp_branches=model_config.num_aspp_branches,
        multi_level=model_config.multi_level,
        train_batch_stats=model_config.bn_mode != "frozen",
    )


def build_discriminator(disc_config: ml_collections.ConfigDict):
    """Builds the output-space discriminator from `config.discriminator`."""
    return discriminators.FCDiscriminator(width=disc_config.width)
