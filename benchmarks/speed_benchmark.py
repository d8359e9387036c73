r"""jaxda vs a PyTorch re-implementation: AdaptSegNet train step and eval forward, side by side.

  python benchmarks/speed_benchmark.py [--model=deeplab_v2] [--height=256 --width=512]
      [--eval_height=512 --eval_width=1024] [--steps=5] [--threads=N] [--depth=101]
      [--impls=xla,fast] [--jobs=train,eval] [--rounds=1] [--xla_flags=...] [--json=OUT.json]
      [--peak_tflops=T]
  python benchmarks/speed_benchmark.py --convs [--model=...] [--conv_reps=5]

jaxda runs once per --impls entry, each in its own process: config.model.conv_impl ('xla',
XLA's own convolutions, or 'fast', `jaxda/models/fast_conv.py`'s dot-based weight gradient),
optionally with '+remat' (config.model.remat: ResNet blocks recomputed in the backward pass),
'+memsched' (XLA:CPU's memory-optimised scheduler, MEMSCHED_FLAG, i.e. config
cpu_memory_scheduler), '+bf16' (config.model.dtype='bfloat16', mixed precision) and
'+nobarrier' (config.model.block_barrier='off'; the others keep 'auto'), e.g.
--impls=xla,fast,fast+memsched. --xla_flags are added to XLA_FLAGS of every jaxda process.
--rounds repeats all runs in turn and pools their step times, so that load from other
processes on the machine hits every run alike. --convs times instead the weight gradient of
every distinct convolution of the train step, XLA's against fast_conv's methods
(`benchmarks/conv_microbenchmark.py`).

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
step, jaxda's compile time, XLA's temporary buffers (`memory_analysis()`, known before running;
the train step's state is donated, and `donated` says whether its buffers were consumed), the
step's FLOPs from XLA's cost analysis and the achieved GFLOP/s (both frameworks are credited
with XLA's FLOP count of the same computation).
Needs the torch extra: pip install -e '.[torch]'.

On a GPU it runs unchanged: jaxda on JAX's default backend (`pip install -e '.[cuda]'`), PyTorch
(`benchmarks/speed_torch.py`) on CUDA if the installed torch build sees the GPU, else on the
CPU (then the ratio compares a GPU with a CPU: install a CUDA build of torch). Memory is then
the device's peak (JAX's `memory_stats()`, `torch.cuda.max_memory_allocated`), and MFU rates
the achieved FLOP/s against the GPU's peak (PEAK_TFLOPS, or --peak_tflops for other devices).
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
from typing import NamedTuple

import numpy as np

WORKERS = ("jax_train", "torch_train", "jax_eval", "torch_eval")
IMPLS = ("xla", "fast")
OPTIONS = ("remat", "memsched", "bf16", "nobarrier")
# Dense (no sparsity) peak TFLOP/s of GPUs, (TF32, BF16) tensor cores, by a fragment of the
# device name (first match), from NVIDIA's data sheets (SXM parts unless named). MFU rates
# float32 runs against TF32: XLA's default precision and PyTorch's convolutions use TF32 on
# these GPUs. Other devices (CPUs included): pass --peak_tflops.
PEAK_TFLOPS = {
    "H100 PCIe": (378.0, 756.0),
    "H100": (494.7, 989.4),
    "H200": (494.7, 989.4),
    "A100": (156.0, 312.0),
}
MEMSCHED_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
JOBS = ("train", "eval")
NUM_CLASSES = 19
# --model -> (report name, default --depth).
MODELS = {"deeplab_v2": ("DeepLabV2", 101), "deeplabv3plus": ("DeepLabV3+", 50)}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inputs(args, size):
    rng = np.random.default_rng(0)
    height, width = size
    image = lambda: (rng.standard_normal((1, height, width, 3)) * 50).astype(np.float32)  # noqa: E731
    label = rng.integers(0, NUM_CLASSES, (1, height, width)).astype(np.int32)
    return image(), label, image()


def stage_sizes(depth: int):
    from jaxda.models import resnet

    return resnet.STAGE_SIZES[depth]


def time_steps(run_step, steps: int) -> list[float]:
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


def config_of(args):
    """AdaptSegNet's config (multi-level, lambda_adv 0.001 / 0.0002) with --model's network."""
    from configs import adaptseg

    config = adaptseg.get_config(f"model={args.model}")
    config.model.depth = args.depth
    config.model.conv_impl = args.conv_impl
    config.model.remat = args.remat
    config.model.dtype = args.dtype
    config.model.block_barrier = args.block_barrier
    config.num_devices = 1
    return config


def _temp_mib(compiled) -> float:
    """XLA's temporary buffers of a compiled function (MiB), known before it runs."""
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")


def _jax_device_result(result: dict) -> dict:
    """Adds the accelerator's peak memory and name (GPU, TPU) to a jaxda worker's result."""
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        result["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
        result["device"] = device.device_kind
    return result


def _jax_eval_model(args):
    from jaxda import models

    model_config = config_of(args).model
    if args.model == "deeplabv3plus":
        model_config.multi_level = False  # Evaluation reads the main head only.
    return models.build_segmenter(model_config, NUM_CLASSES)


def jax_train(args) -> dict:
    import jax

    from jaxda import mesh as mesh_lib
    from jaxda.train import trainer

    baseline = rss_mib()
    config = config_of(args)
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    state = trainer.init_state(config, setup)
    source, label, target = inputs(args, (args.height, args.width))
    batch = mesh_lib.to_global(
        {"source": {"image": source, "label": label}, "target": {"image": target}}, mesh
    )
    start = time.perf_counter()
    compiled = trainer.jit_train_step(config, setup).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}
    first_leaf = jax.tree.leaves(state)[0]

    def run_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    times = time_steps(run_step, args.steps)
    return _jax_device_result(dict(
        times=times, compile_s=compile_s, flops=_flops(compiled), baseline_mib=baseline,
        temp_mib=_temp_mib(compiled), donated=first_leaf.is_deleted(),
    ))  # fmt: skip


def jax_eval(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxda.models.layers import resize_bilinear_align_corners

    baseline = rss_mib()
    model = _jax_eval_model(args)
    image, _, _ = inputs(args, (args.eval_height, args.eval_width))
    variables = jax.jit(lambda key: model.init(key, image, train=False))(jax.random.key(0))
    label_size = (2 * args.eval_height, 2 * args.eval_width)

    def predict(variables, image):
        logits = model.apply(variables, image, train=False)["main"]
        return jnp.argmax(resize_bilinear_align_corners(logits, label_size), axis=-1)

    start = time.perf_counter()
    compiled = jax.jit(predict).lower(variables, image).compile()
    compile_s = time.perf_counter() - start
    times = time_steps(lambda: jax.block_until_ready(compiled(variables, image)), args.steps)
    return _jax_device_result(dict(
        times=times, compile_s=compile_s, flops=_flops(compiled), baseline_mib=baseline,
        temp_mib=_temp_mib(compiled),
    ))  # fmt: skip


def run_worker(args) -> None:
    os.sched_setaffinity(0, range(args.threads))
    if args.worker.startswith("torch"):
        import torch

        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
    if args.worker.startswith("torch"):
        from benchmarks import speed_torch

        result = getattr(speed_torch, args.worker)(args)
    else:
        result = globals()[args.worker](args)
    result["peak_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


class ImplEntry(NamedTuple):
    """One --impls entry: the config.model keys it sets and the XLA flags it adds."""

    conv_impl: str
    remat: bool
    xla_flags: str
    dtype: str
    block_barrier: str


def parse_impl(entry: str) -> ImplEntry:
    """'fast+remat+memsched+bf16+nobarrier' -> its `ImplEntry` (block_barrier 'auto' unless
    +nobarrier)."""
    impl, *options = entry.split("+")
    if impl not in IMPLS or set(options) - set(OPTIONS):
        raise ValueError(
            f"--impls entry {entry!r}: IMPL[+OPTION...], IMPL in {IMPLS}, OPTION in {OPTIONS}"
        )
    return ImplEntry(
        conv_impl=impl,
        remat="remat" in options,
        xla_flags=MEMSCHED_FLAG if "memsched" in options else "",
        dtype="bfloat16" if "bf16" in options else "float32",
        block_barrier="off" if "nobarrier" in options else "auto",
    )


def _child(worker: str, args, impl_entry: str = "xla") -> dict:
    entry = parse_impl(impl_entry)
    command = [sys.executable, os.path.abspath(__file__), f"--worker={worker}"]
    skip = ("worker", "json", "conv_impl", "convs", "xla_flags", "impls", "jobs", "remat", "dtype",
            "block_barrier")  # fmt: skip
    command += [f"--{k}={v}" for k, v in vars(args).items() if k not in skip and v is not None]
    command += [f"--conv_impl={entry.conv_impl}", f"--dtype={entry.dtype}"]
    command += [f"--block_barrier={entry.block_barrier}"] + (["--remat"] if entry.remat else [])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])),
    }
    flags = " ".join(filter(None, [args.xla_flags, entry.xla_flags]))
    if worker.startswith("jax") and flags:
        env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), flags]))
    print(f"running {worker} {impl_entry if worker.startswith('jax') else ''}...", flush=True)
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


def peak_tflops(device: str | None, bfloat16: bool, override: float | None) -> float | None:
    """The device's dense peak TFLOP/s for the run's precision (`PEAK_TFLOPS`), or None."""
    if override:
        return override
    for fragment, (tf32, bf16) in PEAK_TFLOPS.items():
        if device and fragment in device:
            return bf16 if bfloat16 else tf32
    return None


def _row(label: str, result: dict, torch_s: float, flops: float, args, bfloat16=False) -> str:
    seconds = statistics.median(result["times"])
    if "device_peak_mib" in result:  # GPU: the device's peak, not the host process's.
        memory = f"{result['device_peak_mib']:.0f} (device)"
    else:
        peak, base = result["peak_mib"], result["baseline_mib"]
        memory = f"{peak:.0f} (+{peak - base:.0f})"
    jax_only = lambda key, fmt: format(result[key], fmt) if key in result else "-"  # noqa: E731
    donated = {True: "yes", False: "NO"}.get(result.get("donated"), "-")
    peak = peak_tflops(result.get("device"), bfloat16, args.peak_tflops)
    mfu = f"{100 * flops / seconds / (peak * 1e12):.1f}%" if peak else "-"
    return (
        f"| {label} | {seconds:.3f} | {seconds / torch_s:.2f} | {memory} "
        f"| {jax_only('temp_mib', '.0f')} | {donated} | {jax_only('compile_s', '.1f')} "
        f"| {flops / 1e9 / seconds:.1f} | {mfu} |"
    )


def _report(results: dict, args) -> str:
    rows = []
    model = f"{MODELS[args.model][0]}-R{args.depth}"
    for job, shape in (
        ("train", f"{args.height}x{args.width}"),
        ("eval", f"{args.eval_height}x{args.eval_width}"),
    ):
        if job not in args.jobs:
            continue
        torch_r = results[f"torch_{job}"]
        torch_s = statistics.median(torch_r["times"])
        flops = results[f"jax_{job}/{args.impls[0]}"]["flops"]
        rows.append(_row(f"{model} {job} {shape} PyTorch", torch_r, torch_s, flops, args))
        for impl in args.impls:
            label = f"{model} {job} {shape} jaxda {impl}"
            result, bfloat16 = results[f"jax_{job}/{impl}"], "bf16" in impl.split("+")
            rows.append(_row(label, result, torch_s, flops, args, bfloat16))
        rows.append(f"| ({job}: {flops / 1e9:.1f} GFLOP per step, XLA's count) ||||||||| ")
    header = (
        "| job | median s | / PyTorch | peak MiB (+model) | XLA temp MiB | state donated "
        "| compile s | GFLOP/s | MFU |\n|---|---|---|---|---|---|---|---|---|"
    )
    devices = sorted({r["device"] for r in results.values() if "device" in r})
    machine = (
        (f"{', '.join(devices)} (host: " if devices else "")
        + f"{_cpu_name()}, {os.cpu_count()} cores visible{')' if devices else ''}, "
        f"{args.threads} threads per framework, {model}, {args.steps} timed steps"
        + (f" x {args.rounds} rounds" if args.rounds > 1 else "")
        + (f", XLA_FLAGS+={args.xla_flags}" if args.xla_flags else "")
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
    parser.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help="jaxda's runs: IMPL[+OPTION...], e.g. fast+memsched, fast+nobarrier",
    )
    parser.add_argument("--jobs", default=",".join(JOBS), help="train, eval or both.")
    parser.add_argument("--rounds", type=int, default=1, help="Runs of every job, in turn.")
    parser.add_argument("--xla_flags", default="", help="Added to XLA_FLAGS of jaxda's runs.")
    parser.add_argument("--convs", action="store_true", help="Per-conv dW microbenchmark.")
    parser.add_argument("--conv_reps", type=int, default=5)
    parser.add_argument("--conv_impl", default="xla", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--remat", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--block_barrier", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=WORKERS)
    parser.add_argument("--json", default=None, help="Also write the raw results here.")
    parser.add_argument(
        "--peak_tflops", type=float, default=None,
        help="The device's peak TFLOP/s for MFU (default: PEAK_TFLOPS for known GPUs).",
    )  # fmt: skip
    args = parser.parse_args()
    if args.depth is None:
        args.depth = MODELS[args.model][1]
    if args.worker:
        run_worker(args)
        return
    if args.convs:
        os.sched_setaffinity(0, range(args.threads))  # Before XLA sizes its thread pool.
        sys.path.insert(0, _ROOT)
        from benchmarks import conv_microbenchmark

        print(conv_microbenchmark.run(args, config_of(args)))
        return
    args.impls, args.jobs = tuple(args.impls.split(",")), tuple(args.jobs.split(","))
    try:
        for entry in args.impls:
            parse_impl(entry)
    except ValueError as e:
        parser.error(str(e))
    if set(args.jobs) - set(JOBS):
        parser.error(f"--jobs: use {JOBS}")
    results = {}
    for _ in range(args.rounds):
        for job in args.jobs:
            runs = [(f"torch_{job}", f"torch_{job}", "xla")]
            runs += [(f"jax_{job}/{impl}", f"jax_{job}", impl) for impl in args.impls]
            for key, worker, impl in runs:
                result = _child(worker, args, impl)
                if key in results:  # Pool the step times of all rounds.
                    result["times"] = results[key]["times"] + result["times"]
                    result["peak_mib"] = max(result["peak_mib"], results[key]["peak_mib"])
                results[key] = result
    table = _report(results, args)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
