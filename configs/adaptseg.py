r"""AdaptSegNet: multi-level output-space adversarial adaptation (Tsai et al., CVPR 2018).

https://arxiv.org/abs/1802.10349 -- official code: github.com/wasidennis/AdaptSegNet.
Published: 42.4 mIoU GTA5 -> Cityscapes (DeepLabV2-R101, multi-level; oracle 65.1),
44.1 with the LS-GAN single-level variant.

  python -m launch.main --config=configs/adaptseg.py --workdir=/tmp/adaptseg      # GTA5 -> CS
  python -m launch.main --config=configs/adaptseg.py:source=synthia --workdir=...  # SYNTHIA
  python -m launch.main --config=configs/adaptseg.py:synthetic --workdir=/tmp/as  # built-in
  variants (combine with commas): single (main head only), ls (LS-GAN)

The AdaptSegNet repository has no SYNTHIA code; `source=synthia` uses the same values with
SYNTHIA at 1280x760 and reports mIoU-16 (and mIoU-13, mIoU-19).

Faithful to the official code by default: 2 of the 4 ASPP branches summed (the code returns
inside the loop; `--config.model.num_aspp_branches=4` gives the fixed head), BN in training
mode with frozen affine, lambda_adv 0.0002 (aux) / 0.001 (main), poly over 250k steps stopped
at 150k. On the synthetic benchmark lambda_adv is 0.01 (main) / 0.002 (aux): the published
weights are tuned for DeepLabV2 over 150k steps and barely move a small network in 600 steps
(set `--config.adversarial.lambda_adv.main=0.001 --config.adversarial.lambda_adv.aux=0.0002` for
the published ones).
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(
        arg,
        synthetic=False,
        folders=False,
        source="gta5",
        single=False,
        ls=False,
        model="deeplab_v2",
    )
    config = common.base_config()
    config.method = "adaptseg"
    config.adversarial = common.adversarial_block(0.001, 0.0002)
    common.select_data(config, args)
    common.select_model(config, args)
    if args.synthetic:
        config.adversarial.lambda_adv = {"main": 0.01, "aux": 0.002}
    if args.single:
        # AdaptSegNet's single-level setting: main head only, no aux CE.
        config.model.multi_level = False
        config.loss.lambda_seg_aux = 0.0
    if args.ls:
        config.adversarial.gan = "ls"
        if args.single and not args.synthetic:
            config.adversarial.lambda_adv.main = 0.01  # The README's single-level LS-GAN value.
    if args.folders:
        common.use_folders(config)
    return config
