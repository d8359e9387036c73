"""Fabricated PyTorch-named state dicts (NumPy) in the published checkpoints' layouts.

Written from the key tables of docs/methods/checkpoints.md, independently of the
converter's parsing, so the tests check one against the other.
"""

import numpy as np

DISC_MODULES = ("conv1", "conv2", "conv3", "conv4", "classifier")


def backbone(rng, stage_sizes=(1, 1, 1, 1), width=4, tracked=True) -> dict:
    """Caffe ResNet keys (conv1, bn1, layer{L}.{b}.*) with random values, PyTorch shapes."""
    sd = {}

    def conv(name, out, inp, k):
        sd[f"{name}.weight"] = rng.normal(0, 0.1, (out, inp, k, k)).astype(np.float32)

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        if tracked:
            sd[f"{name}.num_batches_tracked"] = np.array(7, np.int64)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for layer, (blocks, mult) in enumerate(zip(stage_sizes, (1, 2, 4, 8), strict=True), 1):
        planes = width * mult
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            conv(f"{p}.conv1", planes, inplanes, 1)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                conv(f"{p}.downsample.0", planes * 4, inplanes, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return sd


def head(rng, module, in_channels, classes=19, trained_branches=4) -> dict:
    """ASPP `module.conv2d_list.{0..3}`: branches >= trained_branches look like the N(0, 0.01)
    init with PyTorch default biases; the others like trained weights."""
    sd = {}
    bound = 1 / np.sqrt(in_channels * 9)
    for i in range(4):
        shape = (classes, in_channels, 3, 3)
        if i < trained_branches:
            weight = rng.normal(0.002, 0.03, shape)
            bias = rng.normal(0, 0.2, classes)
        else:
            weight = rng.normal(0, 0.01, shape)
            bias = rng.uniform(-bound, bound, classes)
        sd[f"{module}.conv2d_list.{i}.weight"] = weight.astype(np.float32)
        sd[f"{module}.conv2d_list.{i}.bias"] = bias.astype(np.float32)
    return sd


def multi_level(rng, width=4, classes=19, trained_branches=4, tracked=True) -> dict:
    """AdaptSegNet / ADVENT ResNetMulti: layer5 aux on layer3, layer6 main on layer4."""
    return {
        **backbone(rng, width=width, tracked=tracked),
        **head(rng, "layer5", width * 16, classes, trained_branches),
        **head(rng, "layer6", width * 32, classes, trained_branches),
    }


def discriminator(rng, in_channels=19, width=4, names=DISC_MODULES) -> dict:
    sd, inp = {}, in_channels
    for name, out in zip(names, (width, width * 2, width * 4, width * 8, 1), strict=True):
        sd[f"{name}.weight"] = rng.normal(0, 0.05, (out, inp, 4, 4)).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.05, out).astype(np.float32)
        inp = out
    return sd


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def proda_head(rng, in_channels, classes=19, width=256, dilations=4) -> dict:
    """ProDA's `layer5` (`Classifier_Module2`): five conv + GroupNorm branches, the SE linears
    (PyTorch [out, in]), the 3x3 fuse conv + GroupNorm, the bias-free 1x1 classifier."""
    sd = {}

    def draw(name, shape, scale=0.1):
        sd[name] = rng.normal(0, scale, shape).astype(np.float32)

    def group_norm(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.2, c).astype(np.float32)

    for i in range(dilations + 1):
        k = 1 if i == 0 else 3
        draw(f"layer5.conv2d_list.{i}.0.weight", (width, in_channels, k, k))
        draw(f"layer5.conv2d_list.{i}.0.bias", (width,))
        group_norm(f"layer5.conv2d_list.{i}.1", width)
    concat = width * (dilations + 1)
    draw("layer5.bottleneck.0.se.0.weight", (concat // 16, concat))
    draw("layer5.bottleneck.0.se.0.bias", (concat // 16,))
    draw("layer5.bottleneck.0.se.2.weight", (concat, concat // 16))
    draw("layer5.bottleneck.0.se.2.bias", (concat,))
    draw("layer5.bottleneck.1.weight", (width, concat, 3, 3))
    draw("layer5.bottleneck.1.bias", (width,))
    group_norm("layer5.bottleneck.2", width)
    draw("layer5.head.1.weight", (classes, width, 1, 1))
    return sd


def proda(rng, stage_sizes=(1, 1, 1, 1), width=4, classes=19, head_width=256, bn_clr=False):
    """A ProDA network's state dict (`ResNet101.model_state`)."""
    sd = {
        **backbone(rng, stage_sizes, width),
        **proda_head(rng, width * 32, classes, head_width),
    }
    if bn_clr:
        c = width * 32
        sd["bn_pretrain.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd["bn_pretrain.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd["bn_pretrain.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd["bn_pretrain.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd["bn_pretrain.num_batches_tracked"] = np.array(7, np.int64)
    return sd


# SimCLRv2-Pytorch (Separius) module names of a sk0 ResNet, from its resnet.py:
# ResNet.net = (Stem = (conv, BatchNormRelu = (BN, ReLU), MaxPool), Blocks x 4), Blocks.blocks
# = [BottleneckBlock], BottleneckBlock.net = (conv, BNReLU, conv, BNReLU, conv, BN[, Identity]),
# BottleneckBlock.projection = Projection(shortcut conv, bn = BNReLU(relu=False)).
_SEPARIUS = {
    "conv1": "net.0.0",
    "bn1": "net.0.1.0",
    "conv1_b": "net.0",
    "bn1_b": "net.1.0",
    "conv2_b": "net.2",
    "bn2_b": "net.3.0",
    "conv3_b": "net.4",
    "bn3_b": "net.5.0",
    "downsample.0": "projection.shortcut",
    "downsample.1": "projection.bn.0",
}


def simclrv2_pytorch(sd: dict) -> dict:
    """torchvision-named backbone keys renamed as SimCLRv2-Pytorch's convert.py writes them
    (`{'resnet': model.state_dict()}`), e.g. layer2.0.bn1.weight -> net.2.blocks.0.net.1.0.weight.
    """
    out = {}
    for key, value in sd.items():
        *module, field = key.split(".")
        if module[0] in ("conv1", "bn1"):
            name = _SEPARIUS[module[0]]
        elif module[0] == "fc":
            name = "fc"
        else:
            layer, block, rest = module[0][len("layer") :], module[1], ".".join(module[2:])
            inner = _SEPARIUS.get(f"{rest}_b") or _SEPARIUS[rest]
            name = f"net.{layer}.blocks.{block}.{inner}"
        out[f"{name}.{field}"] = value
    return out
