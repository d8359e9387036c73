"""A PyTorch ProDA DeepLabV2 (Caffe ResNet + `Classifier_Module2`), written from
docs/methods/proda.md ("Network") and the key list in docs/methods/checkpoints.md (ProDA).

For numerical parity tests of `jaxda.models.proda`; nothing else in jaxda imports this module.
Module names follow ProDA's, so `state_dict()` keys are ProDA's:

  conv1, bn1, layer1..layer4 (as `torch_reference.DeepLabV2Torch`), [bn_pretrain],
  layer5.conv2d_list.{0..4}.{0: conv, 1: GroupNorm}, layer5.bottleneck.0.se.{0, 2} (Linear),
  layer5.bottleneck.{1: 3x3 conv, 2: GroupNorm}, layer5.head.1 (1x1 conv, no bias)
"""

import torch
from torch import nn

from jaxda.interop import torch_reference

GROUPS = 32


class SEBlock(nn.Module):
    """Squeeze-excitation: global average pool -> Linear(C, C/16) -> ReLU -> Linear -> sigmoid
    -> channel scaling (NCHW -> NCHW)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.se = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.se(x.mean(dim=(2, 3)))
        return x * scale[:, :, None, None]


class ClassifierModule2(nn.Module):
    """ProDA's head: five conv-GN-ReLU branches, concat, SE, 3x3 conv-GN, Dropout2d, 1x1."""

    def __init__(self, inplanes: int, dilations, num_classes: int, width: int = 256):
        super().__init__()
        branches = [
            nn.Sequential(
                nn.Conv2d(inplanes, width, 1, bias=True), nn.GroupNorm(GROUPS, width), nn.ReLU()
            )
        ]
        for d in dilations:
            branches.append(
                nn.Sequential(
                    nn.Conv2d(inplanes, width, 3, padding=d, dilation=d, bias=True),
                    nn.GroupNorm(GROUPS, width),
                    nn.ReLU(),
                )
            )
        self.conv2d_list = nn.ModuleList(branches)
        concat = width * (len(dilations) + 1)
        self.bottleneck = nn.Sequential(
            SEBlock(concat),
            nn.Conv2d(concat, width, 3, padding=1, bias=True),
            nn.GroupNorm(GROUPS, width),
        )
        self.head = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(width, num_classes, 1, bias=False))

    def forward(self, x: torch.Tensor):
        """-> (feat [N, width, h, w] after dropout, logits [N, classes, h, w])."""
        out = torch.cat([branch(x) for branch in self.conv2d_list], dim=1)
        feat = self.head[0](self.bottleneck(out))
        return feat, self.head[1](feat)


class ProDADeepLabV2Torch(nn.Module):
    """The Caffe ResNet of `torch_reference.DeepLabV2Torch` + `ClassifierModule2` as `layer5`.

    `forward(x)` takes NCHW float32 and returns {'feat', 'out'} at output stride 8 (not
    upsampled), as ProDA's network does.
    """

    def __init__(
        self,
        num_classes: int = 19,
        layers=(3, 4, 23, 3),
        width: int = 64,
        head_width: int = 256,
        dilations=(6, 12, 18, 24),
        bn_clr: bool = False,
    ):
        super().__init__()
        base = torch_reference.DeepLabV2Torch(num_classes, layers, width, multi_level=False)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(base, name))
        self.bn_pretrain = nn.BatchNorm2d(width * 32) if bn_clr else None
        self.layer5 = ClassifierModule2(width * 32, dilations, num_classes, head_width)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.bn_pretrain is not None:
            x = self.bn_pretrain(x)
        feat, out = self.layer5(x)
        return {"feat": feat, "out": out}
