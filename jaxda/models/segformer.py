"""SegFormer / DAFormer: the MiT encoder (`mit.py`) with the all-MLP or the DAFormer decoder
(`segformer_heads.py`), registered as one segmenter, 'segformer', whose `decoder` selects the
head: both share the encoder, its config keys and its checkpoints (an ImageNet `mit_b*.pth`
loads into either), and only the head's parameters differ.
"""

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import ml_collections

from jaxda.models import layers, mit, segformer_heads

DECODERS = ("daformer", "mlp")


class SegFormer(nn.Module):
    """MiT encoder + decoder: [N, H, W, 3] -> {'main': [N, h1, w1, num_classes]} at stride 4.

    Attributes:
      num_classes: output classes.
      embed_dims / depths / num_heads / sr_ratios / mlp_ratio / drop_path_rate: the encoder
        (`mit.MixVisionTransformer`; `mit.VARIANTS` for B0-B5).
      decoder: 'daformer' (`segformer_heads.DAFormerHead`) or 'mlp' (`SegFormerHead`).
      decoder_embed_dim: width of each stage's embedding (DAFormer 256; SegFormer 256 for
        B0 / B1, 768 for B2-B5).
      decoder_width: DAFormer's fusion width (256); unused by 'mlp'.
      aspp_dilations: DAFormer's fusion branches ((1, 6, 12, 18)); unused by 'mlp'.
      dropout_rate: the decoder's Dropout2d before the classifier (0.1).
      train_batch_stats: in training, the decoder's BN normalises with batch statistics and
        updates its running ones (`layers.BN_MODES`).
      convolution: how every conv runs, and the dtype of the matrix products too.
      remat: recompute each transformer block's activations in the backward pass.

    Parameters: {'backbone': encoder, 'head': decoder}. LayerNorms are the encoder's modules
    named 'norm*' (norm1, norm2, normK, patch_embedK/norm, attn/norm; leaves 'scale', 'bias'),
    the ones the official recipe exempts from weight decay; the decoder's BatchNorms are the
    modules named 'bn' (`layers.is_batch_norm_param`), which the official recipe decays like
    the rest of the head. Biases are the leaves named 'bias'.
    """

    # The official recipe: the decoder at 10x the encoder's learning rate.
    param_groups: ClassVar[dict[str, str]] = {"backbone": "backbone", "head": "head"}

    num_classes: int = 19
    embed_dims: Sequence[int] = mit.VARIANTS["b5"][0]
    depths: Sequence[int] = mit.VARIANTS["b5"][1]
    num_heads: Sequence[int] = mit.NUM_HEADS
    sr_ratios: Sequence[int] = mit.SR_RATIOS
    mlp_ratio: int = mit.MLP_RATIO
    drop_path_rate: float = 0.1
    decoder: str = "daformer"
    decoder_embed_dim: int = 256
    decoder_width: int = 256
    aspp_dilations: Sequence[int] = (1, 6, 12, 18)
    dropout_rate: float = 0.1
    train_batch_stats: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION
    remat: bool = False

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, bn_mask: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """[N, H, W, 3] -> {'main': [N, ceil(H / 4), ceil(W / 4), num_classes]}.

        Stochastic depth and dropout are active only with `train=True` and a 'dropout' rng
        (`apply(..., rngs={'dropout': key})`); `train=True` without one runs them off, which
        is DAFormer's teacher forward (BN on batch statistics, no dropout). With `train=True`
        and `train_batch_stats`, call `apply(..., mutable=['batch_stats'])`: the decoder's BN
        then normalises with the batch statistics (of the images `bn_mask` [N] selects, all
        by default) and returns updated running ones. The encoder stage maps 'stage1'..
        'stage4' ([N, h_k, w_k, embed_dims[k]], strides 4..32) are sown into 'intermediates'.
        """
        if self.decoder not in DECODERS:
            raise ValueError(f"config.model.decoder={self.decoder!r}; use one of {DECODERS}")
        deterministic = not (train and self.has_rng("dropout"))
        features = mit.MixVisionTransformer(
            embed_dims=tuple(self.embed_dims),
            depths=tuple(self.depths),
            num_heads=tuple(self.num_heads),
            sr_ratios=tuple(self.sr_ratios),
            mlp_ratio=self.mlp_ratio,
            drop_path_rate=self.drop_path_rate,
            convolution=self.convolution,
            remat=self.remat,
            name="backbone",
        )(images, deterministic)
        for name, value in features.items():
            self.sow("intermediates", name, value)
        ura = not (train and self.train_batch_stats)
        mask = None if bn_mask is None else bn_mask[:, None, None, None]
        if self.decoder == "daformer":
            head = segformer_heads.DAFormerHead(
                self.num_classes, self.decoder_embed_dim, self.decoder_width,
                tuple(self.aspp_dilations), self.dropout_rate, ura, self.convolution,
                name="head",
            )  # fmt: skip
        else:
            head = segformer_heads.SegFormerHead(
                self.num_classes, self.decoder_embed_dim, self.dropout_rate, ura,
                self.convolution, name="head",
            )  # fmt: skip
        return {"main": head(list(features.values()), mask, deterministic)}

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict, num_classes: int):
        """From config.model (`configs.common.use_mit` lists the keys): `variant` names the
        encoder in `mit.VARIANTS`; embed_dims / depths / num_heads / sr_ratios, when set,
        override it."""
        variant = model_config.variant
        if variant not in mit.VARIANTS:
            raise ValueError(f"config.model.variant={variant!r}; use one of {sorted(mit.VARIANTS)}")
        embed_dims, depths = mit.VARIANTS[variant]

        def get(key, default):
            value = model_config.get(key)
            return default if value is None else tuple(value)

        return cls(
            num_classes=num_classes,
            embed_dims=get("embed_dims", embed_dims),
            depths=get("depths", depths),
            num_heads=get("num_heads", mit.NUM_HEADS),
            sr_ratios=get("sr_ratios", mit.SR_RATIOS),
            mlp_ratio=model_config.get("mlp_ratio", mit.MLP_RATIO),
            drop_path_rate=model_config.drop_path_rate,
            decoder=model_config.decoder,
            decoder_embed_dim=model_config.decoder_embed_dim,
            decoder_width=model_config.decoder_width,
            aspp_dilations=tuple(model_config.aspp_dilations),
            dropout_rate=model_config.dropout_rate,
            train_batch_stats=layers.train_batch_stats(model_config.bn_mode),
            convolution=layers.Convolution.from_config(model_config),
            remat=model_config.get("remat", False),
        )
