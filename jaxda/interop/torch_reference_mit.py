"""A PyTorch MiT encoder, SegFormer all-MLP head and DAFormer head, transcribed from the
official code's description, for parity tests of `jaxda.models.mit`, `segformer_heads` and
`segformer` (nothing else in jaxda imports it).

Module names follow the official code, so `state_dict()` has the released checkpoints' keys:

  MixVisionTransformerTorch (`mit_b*.pth`, raw state dict): patch_embed{1..4}.{proj,norm},
    block{1..4}.{j}.{norm1, attn.{q,kv,sr,norm,proj}, norm2, mlp.{fc1,dwconv.dwconv,fc2}},
    norm{1..4}, and with `num_classes` > 0 the ImageNet classifier `head`
  SegFormerHeadTorch (NVlabs): linear_c{1..4}.proj, linear_fuse.{conv,bn}, linear_pred, and
    the unused `conv_seg` every mmseg decode head creates; concatenates [c4, c3, c2, c1]
  DAFormerHeadTorch: embed_layers.{0..3}.proj, fuse_layer.aspp_modules.0.{conv,bn},
    fuse_layer.aspp_modules.{1..3}.{depthwise_conv,pointwise_conv}.{conv,bn},
    fuse_layer.bottleneck.{conv,bn}, conv_seg; concatenates [c1, c2, c3, c4]
  EncoderDecoderTorch: backbone.*, decode_head.* (NVlabs segmentation checkpoints; a DAFormer
    training checkpoint holds the same under `model.`, `ema_model.`, `imnet_model.`)

Modules take and return NCHW tensors; the encoder returns its four stage maps.
"""

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}


class DropPath(nn.Module):
    """timm 0.3.2's per-sample stochastic depth: x / keep * floor(keep + U[0, 1))."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = torch.floor(keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype))
        return x / keep * mask


class OverlapPatchEmbed(nn.Module):
    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(
            in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2
        )
        self.norm = nn.LayerNorm(embed_dim)  # PyTorch's default eps 1e-5.

    def forward(self, x):
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5.

    def forward(self, x, h, w):
        b, n, c = x.shape
        d = c // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, d).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x_ = x.permute(0, 2, 1).reshape(b, c, h, w)
            x_ = self.norm(self.sr(x_).reshape(b, c, -1).permute(0, 2, 1))
        else:
            x_ = x
        kv = self.kv(x_).reshape(b, -1, 2, self.num_heads, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        b, _, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, h, w):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformerTorch(nn.Module):
    """MiT: NCHW image -> [stage1, stage2, stage3, stage4] NCHW maps (strides 4 to 32)."""

    def __init__(
        self,
        embed_dims=VARIANTS["b5"][0],
        depths=VARIANTS["b5"][1],
        num_heads=(1, 2, 5, 8),
        mlp_ratios=(4, 4, 4, 4),
        sr_ratios=(8, 4, 2, 1),
        drop_path_rate=0.1,
        num_classes=0,
    ):
        super().__init__()
        self.depths = depths
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        embeds = ((7, 4), (3, 2), (3, 2), (3, 2))
        in_chans, k = 3, 0
        for i in range(4):
            kernel, stride = embeds[i]
            setattr(self, f"patch_embed{i + 1}",
                    OverlapPatchEmbed(kernel, stride, in_chans, embed_dims[i]))  # fmt: skip
            blocks = [
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], rates[k + j])
                for j in range(depths[i])
            ]
            setattr(self, f"block{i + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=1e-6))
            in_chans, k = embed_dims[i], k + depths[i]
        if num_classes:  # The ImageNet classifier of the mit_b*.pth files.
            self.head = nn.Linear(embed_dims[3], num_classes)

    def forward(self, x):
        b = x.shape[0]
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


class MLP(nn.Module):
    """The heads' per-pixel embedding: NCHW -> tokens -> Linear (`proj`) -> NCHW."""

    def __init__(self, input_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.proj(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(b, -1, h, w)


class ConvModule(nn.Module):
    """mmcv ConvModule with BN and ReLU (bias off since a norm follows)."""

    def __init__(self, cin, cout, kernel=1, dilation=1, groups=1):
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, groups=groups,
                              bias=False)  # fmt: skip
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SegFormerHeadTorch(nn.Module):
    """NVlabs SegFormer's all-MLP head (concatenation [c4, c3, c2, c1])."""

    def __init__(self, in_channels, embed_dim, num_classes, dropout=0.1):
        super().__init__()
        for i, c in enumerate(in_channels, start=1):
            setattr(self, f"linear_c{i}", MLP(c, embed_dim))
        self.linear_fuse = ConvModule(4 * embed_dim, embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        self.conv_seg = nn.Conv2d(embed_dim, num_classes, 1)  # BaseDecodeHead's, unused.

    def forward(self, features):
        size = features[0].shape[2:]
        embedded = [
            _resize(getattr(self, f"linear_c{i}")(x), size) for i, x in enumerate(features, 1)
        ]
        x = self.linear_fuse(torch.cat(embedded[::-1], dim=1))
        return self.linear_pred(self.dropout(x))


class DepthwiseSeparableConvModule(nn.Module):
    def __init__(self, cin, cout, dilation):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, 3, dilation, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class ASPPWrapper(nn.Module):
    """DAFormer's `fuse_layer`: separable ASPP (no pooling) + 3x3 bottleneck."""

    def __init__(self, cin, width, dilations):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvModule(cin, width, 1) if d == 1 else DepthwiseSeparableConvModule(cin, width, d)
            for d in dilations
        )
        self.bottleneck = ConvModule(len(dilations) * width, width, 3)

    def forward(self, x):
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class DAFormerHeadTorch(nn.Module):
    """DAFormer's context-aware fusion head (concatenation [c1, c2, c3, c4])."""

    def __init__(self, in_channels, num_classes, embed_dim=256, width=256,
                 dilations=(1, 6, 12, 18), dropout=0.1):  # fmt: skip
        super().__init__()
        self.embed_layers = nn.ModuleDict(
            {str(i): MLP(c, embed_dim) for i, c in enumerate(in_channels)}
        )
        self.fuse_layer = ASPPWrapper(len(in_channels) * embed_dim, width, dilations)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(width, num_classes, 1)

    def forward(self, features):
        size = features[0].shape[2:]
        embedded = [_resize(self.embed_layers[str(i)](x), size) for i, x in enumerate(features)]
        return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(embedded, dim=1))))


class EncoderDecoderTorch(nn.Module):
    """`backbone` + `decode_head`: NCHW image -> NCHW logits at stride 4."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, x):
        return self.decode_head(self.backbone(x))
