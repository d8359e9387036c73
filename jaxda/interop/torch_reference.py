"""A PyTorch DeepLabV2 and output-space discriminator, written from docs/methods/README.md.

For numerical parity tests of jaxda's Flax models and for speed comparisons; nothing else in
jaxda imports this module. Module names follow AdaptSegNet's `ResNetMulti`, so `state_dict()` is
in the `deeplab_multi` layout (single-level: `Res_Deeplab`'s, layout `deeplab_single`):

  conv1, bn1, layer1..layer4 (Bottleneck: conv1/bn1/conv2/bn2/conv3/bn3, block 0 also
  downsample.0 (conv) / downsample.1 (BN)), layer5 / layer6 (ASPP: conv2d_list.0..3)

The Caffe ResNet (docs/methods/README.md, "Backbone"): the 7x7 stride-2 stem and a ceil-mode 3x3
stride-2
max-pool; bottleneck stride in the first 1x1 conv; layer2 stride 2, layer3 / layer4 stride 1
with dilation 2 / 4 (output stride 8); a projection shortcut in block 0 of every layer. The ASPP
classifier holds four dilated 3x3 convs (with bias) and sums the first `num_aspp_branches`
(2 reproduces AdaptSegNet's and MaxSquare's summation bug; all four stay in the state dict).
"""

import torch
from torch import nn

ASPP_DILATIONS = (6, 12, 18, 24)


class Bottleneck(nn.Module):
    """1x1 (stride) -> 3x3 (dilation) -> 1x1 (4 x planes), BN after each, + shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, project: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=1, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = None
        if project:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class ClassifierModule(nn.Module):
    """ASPP: `conv2d_list` of dilated 3x3 convs; the first `num_branches` are summed."""

    def __init__(self, inplanes, dilations, num_classes: int, num_branches: int):
        super().__init__()
        if not 1 <= num_branches <= len(dilations):
            raise ValueError(f"num_branches={num_branches} must be in 1..{len(dilations)}")
        self.num_branches = num_branches
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(inplanes, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.conv2d_list:
            conv.weight.data.normal_(0, 0.01)  # Biases keep PyTorch's default init.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1 : self.num_branches]:
            out = out + conv(x)
        return out


class DeepLabV2Torch(nn.Module):
    """DeepLabV2 (Caffe ResNet + ASPP), optionally multi-level.

    Args:
      num_classes: output channels of the heads.
      layers: blocks in layer1..layer4; (3, 4, 23, 3) is ResNet-101, (3, 4, 6, 3) ResNet-50.
      width: planes of layer1 (64 in the published models).
      num_aspp_branches: ASPP branches summed (2: AdaptSegNet / MaxSquare; 4: ADVENT, da-sac).
      multi_level: `layer5` = aux head on layer3 and `layer6` = main head on layer4 (AdaptSegNet
        `ResNetMulti`); else a single `layer5` head on layer4 (`Res_Deeplab`).
      aspp_dilations: dilations (and paddings) of the ASPP branches.

    `forward(x)` takes NCHW float32 and returns `(aux, main)` logits at output stride 8, not
    upsampled; `aux` is None when single-level.
    """

    def __init__(
        self,
        num_classes: int = 19,
        layers=(3, 4, 23, 3),
        width: int = 64,
        num_aspp_branches: int = 4,
        multi_level: bool = True,
        aspp_dilations=ASPP_DILATIONS,
    ):
        super().__init__()
        self.multi_level = multi_level
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        inplanes = width
        # (planes, stride, dilation) of layer1..layer4.
        specs = ((width, 1, 1), (width * 2, 2, 1), (width * 4, 1, 2), (width * 8, 1, 4))
        for index, (blocks, (planes, stride, dilation)) in enumerate(
            zip(layers, specs, strict=True), start=1
        ):
            modules = []
            for block in range(blocks):
                modules.append(
                    Bottleneck(
                        inplanes,
                        planes,
                        stride if block == 0 else 1,
                        dilation,
                        project=block == 0,
                    )
                )
                inplanes = planes * 4
            setattr(self, f"layer{index}", nn.Sequential(*modules))
        head = (num_classes, num_aspp_branches)
        if multi_level:
            self.layer5 = ClassifierModule(width * 16, aspp_dilations, *head)  # On layer3.
            self.layer6 = ClassifierModule(width * 32, aspp_dilations, *head)  # On layer4.
        else:
            self.layer5 = ClassifierModule(width * 32, aspp_dilations, *head)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.bias is None:
                module.weight.data.normal_(0, 0.01)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.data.fill_(1)
                module.bias.data.zero_()

    def forward(self, x: torch.Tensor):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x3 = self.layer3(x)
        x4 = self.layer4(x3)
        if self.multi_level:
            return self.layer5(x3), self.layer6(x4)
        return None, self.layer5(x4)


class FCDiscriminatorTorch(nn.Module):
    """AdaptSegNet's output-space discriminator: five 4x4 stride-2 convs (padding 1), widths
    w, 2w, 4w, 8w, 1, LeakyReLU(0.2) between them. NCHW -> [N, 1, H/32, W/32] logits."""

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width * 2, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(width * 2, width * 4, 4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(width * 4, width * 8, 4, stride=2, padding=1)
        self.classifier = nn.Conv2d(width * 8, 1, 4, stride=2, padding=1)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = self.leaky_relu(conv(x))
        return self.classifier(x)
