"""PyTorch's side of `benchmarks/speed_benchmark.py` (run in its worker processes).

The same AdaptSegNet train step and evaluation forward as jaxda's, on the PyTorch
re-implementations in `jaxda/interop`, on CUDA when torch sees a GPU (the CUDA build of torch
installed by the user), else on the CPU.
"""

from benchmarks import speed_benchmark as bench

NUM_CLASSES = bench.NUM_CLASSES


def device():
    """torch's device for the benchmark: the first GPU if torch sees one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _synchronized(run_step, dev):
    """run_step, then wait for the GPU (timings must include the queued kernels)."""
    import torch

    def step():
        run_step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return step


def _device_result(result: dict, dev) -> dict:
    import torch

    if dev.type == "cuda":
        result["device_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        result["device"] = torch.cuda.get_device_name(dev)
    return result


def _torch_model(args, train: bool):
    """--model's PyTorch network in `train` or eval mode."""
    from jaxda.interop import torch_reference, torch_reference_v3plus

    layers = bench.stage_sizes(args.depth)
    if args.model == "deeplab_v2":
        model = torch_reference.DeepLabV2Torch(
            num_classes=NUM_CLASSES, layers=layers, num_aspp_branches=2
        )
    else:
        m = bench.config_of(args).model
        model = torch_reference_v3plus.DeepLabV3PlusTorch(
            num_classes=NUM_CLASSES,
            layers=layers,
            width=m.width,
            output_stride=m.output_stride,
            deep_stem=m.deep_stem,
            multi_grid=tuple(m.multi_grid),
            variant=m.variant,
            head_width=m.head_width,
            low_level_width=m.low_level_width,
            aux_width=m.aux_width,
            multi_level=m.multi_level and train,  # Evaluation reads the main head only.
            dropout=m.dropout,
        )
        if train:
            _batch_norm_without_size_check(model.aspp.img_conv[1])
    return model.train(train)


def _batch_norm_without_size_check(bn) -> None:
    """Lets the training-mode `bn` normalise one value per channel, as jaxda's BN does.

    At batch 1, the image-pooling branch's BN sees a [1, C, 1, 1] input: PyTorch's
    `F.batch_norm` refuses it ("Expected more than 1 value per channel"), jaxda normalises it
    (to BN's offset). The ATen op below does the same arithmetic as jaxda, without the check
    (its unbiased running variance becomes NaN, which a training-mode step never reads).
    """
    import torch

    def forward(x):
        return torch.batch_norm(
            x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, bn.momentum, bn.eps,
            False,
        )  # fmt: skip

    bn.forward = forward


def _torch_param_groups(args, model) -> tuple[list, list]:
    """(backbone, head) trainable parameters, grouped as jaxda's optimizer groups them."""
    backbone, heads = [], []
    for name, param in model.named_parameters():
        if args.model == "deeplab_v2":
            # AdaptSegNet: BN affine frozen, the ASPP heads (layer5, layer6) at 10x lr.
            if ".bn" in f".{name}" or "downsample.1" in name:
                param.requires_grad = False
                continue
            is_head = name.startswith(("layer5", "layer6"))
        else:
            # bn_mode 'train': BN affine trained (with weight decay); ASPP, decoder, dsn at 10x.
            is_head = not name.startswith("backbone.")
        (heads if is_head else backbone).append(param)
    return backbone, heads


def torch_train(args) -> dict:
    import torch
    import torch.nn.functional as F

    from jaxda.interop import torch_reference

    torch.manual_seed(0)
    baseline = bench.rss_mib()
    dev = device()
    model = _torch_model(args, train=True).to(dev)
    backbone, heads = _torch_param_groups(args, model)
    lr = 2.5e-4
    optimizer = torch.optim.SGD(
        [{"params": backbone, "lr": lr}, {"params": heads, "lr": 10 * lr}],
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
    )
    discriminators = [torch_reference.FCDiscriminatorTorch(NUM_CLASSES).to(dev) for _ in range(2)]
    disc_optimizers = [
        torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.9, 0.99)) for d in discriminators
    ]
    bce = torch.nn.BCEWithLogitsLoss()
    source, label, target = bench.inputs(args, (args.height, args.width))
    source = torch.from_numpy(source).permute(0, 3, 1, 2).contiguous().to(dev)
    target = torch.from_numpy(target).permute(0, 3, 1, 2).contiguous().to(dev)
    label = torch.from_numpy(label).long().to(dev)
    size = (args.height, args.width)

    def up(x):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def run_step():
        optimizer.zero_grad()
        for opt in disc_optimizers:
            opt.zero_grad()
        for d in discriminators:
            d.requires_grad_(False)
        aux_s, main_s = model(source)
        aux_s, main_s = up(aux_s), up(main_s)
        loss_seg = F.cross_entropy(main_s, label, ignore_index=255)
        loss_seg = loss_seg + 0.1 * F.cross_entropy(aux_s, label, ignore_index=255)
        loss_seg.backward()
        aux_t, main_t = model(target)
        aux_t, main_t = up(aux_t), up(main_t)
        loss_adv = 0.0
        for weight, d, pred in zip((0.0002, 0.001), discriminators, (aux_t, main_t), strict=True):
            out = d(F.softmax(pred, dim=1))
            loss_adv = loss_adv + weight * bce(out, torch.zeros_like(out))
        loss_adv.backward()
        for d in discriminators:
            d.requires_grad_(True)
        for d, pred_s, pred_t in zip(discriminators, (aux_s, main_s), (aux_t, main_t), strict=True):
            for pred, domain in ((pred_s, 0.0), (pred_t, 1.0)):
                out = d(F.softmax(pred.detach(), dim=1))
                (0.5 * bce(out, torch.full_like(out, domain))).backward()
        optimizer.step()
        for opt in disc_optimizers:
            opt.step()

    times = bench.time_steps(_synchronized(run_step, dev), args.steps)
    return _device_result(dict(times=times, baseline_mib=baseline), dev)


def torch_eval(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    baseline = bench.rss_mib()
    dev = device()
    model = _torch_model(args, train=False).to(dev)
    image, _, _ = bench.inputs(args, (args.eval_height, args.eval_width))
    image = torch.from_numpy(image).permute(0, 3, 1, 2).contiguous().to(dev)
    label_size = (2 * args.eval_height, 2 * args.eval_width)

    def run_step():
        with torch.no_grad():
            logits = model(image)[1]
            up = F.interpolate(logits, size=label_size, mode="bilinear", align_corners=True)
            up.argmax(dim=1)

    times = bench.time_steps(_synchronized(run_step, dev), args.steps)
    return _device_result(dict(times=times, baseline_mib=baseline), dev)
