"""A PyTorch HRDA (multi-resolution encoder-decoder, HRDAHead with its scale attention, the
detail loss), transcribed from the official code's description (lhoyer/HRDA:
`hrda_encoder_decoder.py`, `hrda_head.py`) on the MiT / DAFormer-head transcription of
`torch_reference_mit`, for the parity tests of `jaxda.models.hrda` (nothing else in jaxda
imports it).

Module names follow the official code, so `state_dict()` has an HRDA checkpoint's keys:
backbone.*, decode_head.head.* (a DAFormer head), decode_head.scale_attention.* (embed_layers,
fuse_layer.{conv,bn}: DAFormer's head with a 1x1 ConvModule fusion, and conv_seg).

Modules take and return NCHW tensors; boxes are (y1, y2, x1, x2) in full-resolution pixels.
Only scales (lr_scale, 1) and the DAFormer head (output stride 4) are transcribed.
"""

import torch
import torch.nn.functional as F
from torch import nn

from jaxda.interop.torch_reference_mit import MLP, ConvModule, _resize

IGNORE_INDEX = 255


class ConvFusionHeadTorch(nn.Module):
    """The scale attention: DAFormer's head whose fusion is a 1x1 ConvModule."""

    def __init__(self, in_channels, num_classes, embed_dim=256, dropout=0.1):
        super().__init__()
        self.embed_layers = nn.ModuleDict(
            {str(i): MLP(c, embed_dim) for i, c in enumerate(in_channels)}
        )
        self.fuse_layer = ConvModule(len(in_channels) * embed_dim, embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features):
        size = features[0].shape[2:]
        embedded = [_resize(self.embed_layers[str(i)](x), size) for i, x in enumerate(features)]
        return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(embedded, dim=1))))


def scale_box(box, scale):
    return tuple(int(v / scale) for v in box)


def slide_boxes(h_img, w_img, crop, stride):
    """mmseg's sliding windows (row-major)."""
    boxes = []
    for i in range(max(h_img - crop[0] + stride[0] - 1, 0) // stride[0] + 1):
        for j in range(max(w_img - crop[1] + stride[1] - 1, 0) // stride[1] + 1):
            y2, x2 = min(i * stride[0] + crop[0], h_img), min(j * stride[1] + crop[1], w_img)
            boxes.append((max(y2 - crop[0], 0), y2, max(x2 - crop[1], 0), x2))
    return boxes


class HRDAHeadTorch(nn.Module):
    """`head` on both scales, `scale_attention` on the LR features, the attention fusion."""

    def __init__(self, head, scale_attention, lr_scale=0.5, output_stride=4):
        super().__init__()
        self.head = head
        self.scale_attention = scale_attention
        self.lr_scale, self.os = lr_scale, output_stride

    def decode_hr(self, hr_input, batch_size):
        """HR logits; for slide features ({'features', 'boxes'}) averaged on a canvas."""
        if not isinstance(hr_input, dict):
            return self.head(hr_input)
        boxes = [scale_box(b, self.os) for b in hr_input["boxes"]]
        logits = self.head(hr_input["features"])
        h, w = max(b[1] for b in boxes), max(b[3] for b in boxes)
        preds = logits.new_zeros((batch_size, logits.shape[1], h, w))
        count = logits.new_zeros((batch_size, 1, h, w))
        for i, (y1, y2, x1, x2) in enumerate(boxes):
            preds[:, :, y1:y2, x1:x2] += logits[i * batch_size : (i + 1) * batch_size]
            count[:, :, y1:y2, x1:x2] += 1
        return preds / count

    def forward(self, lr_features, hr_input, box=None):
        """-> (fused, lr (1 - attention weighted), hr); `box` the training crop or None."""
        lr = self.head(lr_features)
        hr = self.decode_hr(hr_input, lr.shape[0])
        att = torch.sigmoid(self.scale_attention(lr_features))
        if box is not None:
            mask = lr.new_zeros((lr.shape[0], 1, *lr.shape[2:]))
            y1, y2, x1, x2 = scale_box(box, self.os / self.lr_scale)
            mask[:, :, y1:y2, x1:x2] = 1
            att = att * mask
        lr = (1 - att) * lr
        factor = 1 / self.lr_scale
        up_lr = F.interpolate(lr, scale_factor=factor, mode="bilinear", align_corners=False)
        att = F.interpolate(att, scale_factor=factor, mode="bilinear", align_corners=False)
        if box is not None:
            inserted = torch.zeros_like(up_lr)
            y1, y2, x1, x2 = scale_box(box, self.os)
            inserted[:, :, y1:y2, x1:x2] = hr
        else:
            inserted = hr
        return att * inserted + up_lr, lr, hr


class HRDAEncoderDecoderTorch(nn.Module):
    """`backbone` + `decode_head` (HRDAHeadTorch) at scales (lr_scale, 1)."""

    def __init__(self, backbone, decode_head, hr_crop_size=(512, 512), lr_scale=0.5):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.crop_size, self.lr_scale = tuple(hr_crop_size), lr_scale

    def _lr_features(self, img):
        lr = F.interpolate(img, scale_factor=self.lr_scale, mode="bilinear", align_corners=False)
        return self.backbone(lr)

    def forward_train(self, img, box):
        """The training forward with the HR crop `box`: (fused, lr, hr)."""
        y1, y2, x1, x2 = box
        hr_features = self.backbone(img[:, :, y1:y2, x1:x2])
        return self.decode_head(self._lr_features(img), hr_features, box)

    def decode(self, img, slide=True):
        """The inference forward (no box) at stride 4: fused logits."""
        lr_features = self._lr_features(img)
        if not slide:
            return self.decode_head(lr_features, self.backbone(img))[0]
        stride = [c // 2 for c in self.crop_size]
        boxes = slide_boxes(*img.shape[2:], self.crop_size, stride)
        crops = torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes], dim=0)
        hr_input = {"features": self.backbone(crops), "boxes": boxes}
        return self.decode_head(lr_features, hr_input)[0]


def mmseg_ce(logits, label, weight=None):
    """mmseg's decode-head loss: logits resized to the labels, per-pixel CE (ignore 255)
    times the weight, averaged over all pixels."""
    logits = F.interpolate(logits, size=label.shape[1:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, label, reduction="none", ignore_index=IGNORE_INDEX)
    return (loss if weight is None else loss * weight).mean()


def hrda_losses(fused, lr, hr, label, weight, box, hr_loss_weight=0.1, lr_loss_weight=0.0):
    """HRDAHead.losses with an HR crop: the weighted sum of the fused, detail and LR terms."""
    y1, y2, x1, x2 = box
    loss = (1 - hr_loss_weight - lr_loss_weight) * mmseg_ce(fused, label, weight)
    if hr_loss_weight > 0:
        crop_weight = None if weight is None else weight[:, y1:y2, x1:x2]
        loss = loss + hr_loss_weight * mmseg_ce(hr, label[:, y1:y2, x1:x2], crop_weight)
    if lr_loss_weight > 0:
        loss = loss + lr_loss_weight * mmseg_ce(lr, label, weight)
    return loss
