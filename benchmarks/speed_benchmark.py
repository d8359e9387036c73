r"""jaxda vs a PyTorch re-implementation: AdaptSegNet train step and eval forward, side by side.

  python benchmarks/speed_benchmark.py [--model=deeplab_v2] [--height=256 --width=512]
      [--eval_height=512 --eval_width=1024] [--steps=5] [--threads=N] [--depth=101]
      [--json=OUT.json]

Measures, on this machine and with the same number of threads for both frameworks:
  * the multi-level AdaptSegNet train step (batch 1 source + 1 target at --height x --width,
    two output-space discriminators on the main and aux heads, SGD + Adam; PyTorch in the
    official order: seg backward, adversarial backward, discriminator backward, then the steps)
    of --model: 'deeplab_v2', DeepLabV2-ResNet-101 as AdaptSegNet trains it (2 ASPP branches,
    BN in training mode with frozen affine; `jaxda/interop/torch_reference.py`), or
    'deeplabv3plus', RobustNet's DeepR50V3PlusD16 as `configs.common.use_deeplabv3plus` sets it
    (torchvision ResNet-50, output stride 16, `dsn` aux head, BN in training mode with its affine
    trained, no dropout; `jaxda/interop/torch_reference_v3plus.py`). --depth defaults to 101 and
    50 respectively,
  * the evaluation forward at --eval_height x --eval_width (main head, logits upsampled with
    align_corners=True to twice the input size as in the Cityscapes protocol, argmax; the
    DeepLabV3+ is built without its aux head there, which the evaluation never reads).
Each measurement runs in its own child process pinned to the same --threads CPU cores
(`os.sched_setaffinity`, `torch.set_num_threads`), so peak memory (the child's maximum
resident set size; `+model` subtracts the resident size after imports) belongs to one
framework and one job. Reported: median step time over --steps timed steps after one warm-up
step, jaxda's compile time, the step's FLOPs from XLA's cost analysis and the achieved GFLOP/s
(both frameworks are credited with XLA's FLOP count of the same computation).
Needs the torch extra: pip install -e '.[torch]'.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

WORKERS = ("jax_train", "torch_train", "jax_eval", "torch_eval")
NUM_CLASSES = 19
# --model -> (report name, default --depth).
MODELS = {"deeplab_v2": ("DeepLabV2", 101), "deeplabv3plus": ("DeepLabV3+", 50)}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(args, size):
    rng = np.random.default_rng(0)
    height, width = size
    image = lambda: (rng.standard_normal((1, height, width, 3)) * 50).astype(np.float32)  # noqa: E731
    label = rng.integers(0, NUM_CLASSES, (1, height, width)).astype(np.int32)
    return image(), label, image()


def _stage_sizes(depth: int):
    from jaxda.models import resnet

    return resnet.STAGE_SIZES[depth]


def _time_steps(run_step, steps: int) -> list[float]:
    times = []
    for _ in range(steps + 1):  # The first step is warm-up.
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return times[1:]


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def _config(args):
    """AdaptSegNet's config (multi-level, lambda_adv 0.001 / 0.0002) with --model's network."""
    from configs import adaptseg

    config = adaptseg.get_config(f"model={args.model}")
    config.model.depth = args.depth
    config.num_devices = 1
    return config


def _jax_eval_model(args):
    from jaxda import models

    model_config = _config(args).model
    if args.model == "deeplabv3plus":
        model_config.multi_level = False  # Evaluation reads the main head only.
    return models.build_segmenter(model_config, NUM_CLASSES)


def _torch_model(args, train: bool):
    """--model's PyTorch network in `train` or eval mode."""
    from jaxda.interop import torch_reference, torch_reference_v3plus

    layers = _stage_sizes(args.depth)
    if args.model == "deeplab_v2":
        model = torch_reference.DeepLabV2Torch(
            num_classes=NUM_CLASSES, layers=layers, num_aspp_branches=2
        )
    else:
        m = _config(args).model
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


def jax_train(args) -> dict:
    import jax

    from jaxda import mesh as mesh_lib
    from jaxda.train import trainer

    baseline = _rss_mib()
    config = _config(args)
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    state = trainer.init_state(config, setup)
    source, label, target = _inputs(args, (args.height, args.width))
    batch = mesh_lib.to_global(
        {"source": {"image": source, "label": label}, "target": {"image": target}}, mesh
    )
    start = time.perf_counter()
    compiled = trainer.jit_train_step(config, setup).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    times = _time_steps(run_step, args.steps)
    return dict(times=times, compile_s=compile_s, flops=_flops(compiled), baseline_mib=baseline)


def jax_eval(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxda.models.layers import resize_bilinear_align_corners

    baseline = _rss_mib()
    model = _jax_eval_model(args)
    image, _, _ = _inputs(args, (args.eval_height, args.eval_width))
    variables = jax.jit(lambda key: model.init(key, image, train=False))(jax.random.key(0))
    label_size = (2 * args.eval_height, 2 * args.eval_width)

    def predict(variables, image):
        logits = model.apply(variables, image, train=False)["main"]
        return jnp.argmax(resize_bilinear_align_corners(logits, label_size), axis=-1)

    start = time.perf_counter()
    compiled = jax.jit(predict).lower(variables, image).compile()
    compile_s = time.perf_counter() - start
    times = _time_steps(lambda: jax.block_until_ready(compiled(variables, image)), args.steps)
    return dict(times=times, compile_s=compile_s, flops=_flops(compiled), baseline_mib=baseline)


def torch_train(args) -> dict:
    import torch
    import torch.nn.functional as F

    from jaxda.interop import torch_reference

    torch.manual_seed(0)
    baseline = _rss_mib()
    model = _torch_model(args, train=True)
    backbone, heads = _torch_param_groups(args, model)
    lr = 2.5e-4
    optimizer = torch.optim.SGD(
        [{"params": backbone, "lr": lr}, {"params": heads, "lr": 10 * lr}],
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
    )
    discriminators = [torch_reference.FCDiscriminatorTorch(NUM_CLASSES) for _ in range(2)]
    disc_optimizers = [
        torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.9, 0.99)) for d in discriminators
    ]
    bce = torch.nn.BCEWithLogitsLoss()
    source, label, target = _inputs(args, (args.height, args.width))
    source = torch.from_numpy(source).permute(0, 3, 1, 2).contiguous()
    target = torch.from_numpy(target).permute(0, 3, 1, 2).contiguous()
    label = torch.from_numpy(label).long()
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

    times = _time_steps(run_step, args.steps)
    return dict(times=times, baseline_mib=baseline)


def torch_eval(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    baseline = _rss_mib()
    model = _torch_model(args, train=False)
    image, _, _ = _inputs(args, (args.eval_height, args.eval_width))
    image = torch.from_numpy(image).permute(0, 3, 1, 2).contiguous()
    label_size = (2 * args.eval_height, 2 * args.eval_width)

    def run_step():
        with torch.no_grad():
            logits = model(image)[1]
            up = F.interpolate(logits, size=label_size, mode="bilinear", align_corners=True)
            up.argmax(dim=1)

    return dict(times=_time_steps(run_step, args.steps), baseline_mib=baseline)


def run_worker(args) -> None:
    os.sched_setaffinity(0, range(args.threads))
    if args.worker.startswith("torch"):
        import torch

        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
    result = globals()[args.worker](args)
    result["peak_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def _child(worker: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), f"--worker={worker}"]
    command += [
        f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "json") and v is not None
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])),
    }
    print(f"running {worker} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{worker} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _report(results: dict, args) -> str:
    rows = []
    model = f"{MODELS[args.model][0]}-R{args.depth}"
    for job, shape in (
        ("train", f"{args.height}x{args.width}"),
        ("eval", f"{args.eval_height}x{args.eval_width}"),
    ):
        jax_r, torch_r = results[f"jax_{job}"], results[f"torch_{job}"]
        jax_s, torch_s = statistics.median(jax_r["times"]), statistics.median(torch_r["times"])
        gflop = jax_r["flops"] / 1e9
        rows.append(
            f"| {model} {job} {shape} | {jax_s:.3f} | {torch_s:.3f} | {jax_s / torch_s:.2f} "
            f"| {jax_r['peak_mib']:.0f} (+{jax_r['peak_mib'] - jax_r['baseline_mib']:.0f}) "
            f"| {torch_r['peak_mib']:.0f} (+{torch_r['peak_mib'] - torch_r['baseline_mib']:.0f}) "
            f"| {jax_r['compile_s']:.1f} | {gflop:.1f} | {gflop / jax_s:.1f} "
            f"| {gflop / torch_s:.1f} |"
        )
    header = (
        "| job | jaxda median s | PyTorch median s | jaxda / PyTorch | jaxda peak MiB (+model) "
        "| PyTorch peak MiB (+model) | jaxda compile s | GFLOP (XLA) | jaxda GFLOP/s "
        "| PyTorch GFLOP/s |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    machine = (
        f"{_cpu_name()}, {os.cpu_count()} cores visible, "
        f"{args.threads} threads per framework, {model}, {args.steps} timed steps"
    )
    return f"{machine}\n\n{header}\n" + "\n".join(rows)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--eval_height", type=int, default=512)
    parser.add_argument("--eval_width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--model", default="deeplab_v2", choices=tuple(MODELS))
    parser.add_argument(
        "--depth", type=int, default=None, choices=(50, 101), help="Default: 101 / 50 (V3+)."
    )
    parser.add_argument("--worker", choices=WORKERS)
    parser.add_argument("--json", default=None, help="Also write the raw results here.")
    args = parser.parse_args()
    if args.depth is None:
        args.depth = MODELS[args.model][1]
    if args.worker:
        run_worker(args)
        return
    results = {worker: _child(worker, args) for worker in WORKERS}
    table = _report(results, args)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
