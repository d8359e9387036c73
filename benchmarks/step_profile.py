r"""Where the time of the benchmark's train step goes, by kind of operation (XLA's profile).

  python benchmarks/step_profile.py [--model=deeplab_v2] [--height=256 --width=512]
      [--impl=fast] [--steps=3] [--threads=N] [--top=12] [--top_per_category=4]
      [--trace_dir=DIR]

Builds the AdaptSegNet train step of `benchmarks/speed_benchmark.py` (same network, batch,
optimizers; --impl as its --impls entries, e.g. 'fast', 'xla', 'fast+bf16'), runs --steps
steps under `jax.profiler` after a warm-up step, and adds up the duration of every XLA
operation the profiler recorded (one event per executed HLO instruction: a convolution, a
matrix product, a fusion of element-wise ops, a copy). Each is classified by its opcode and
the op metadata jax gives it (the Flax module path, `transpose(...)` for backward passes, and
the named scopes 'conv_input_grad' / 'conv_weight_grad' of `jaxda/models/fast_conv.py`,
'resize' and 'optimizer'). A fusion is classified by the operation XLA names it after.

Prints, per category, milliseconds per step and the share of all operations' time, the wall
time of a step, the --top most expensive operations and the most expensive ones of each
category outside the convolutions. XLA:CPU may run independent
operations at once on different threads, so the operations' total can exceed the wall time.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = (
    "conv forward", "conv input gradient (dX)", "conv weight gradient (dW)", "BatchNorm",
    "resize (align_corners matrices)", "optimizer", "copies and transposes",
    "other matrix products", "other (activations, softmax, losses, reductions)",
)  # fmt: skip


def _parse_line(line: str):
    """(name, opcode, op_name, line) of one HLO instruction line, or None."""
    head = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)", line)
    opcode = head and re.search(r"\s([a-z][a-z0-9_\-]*)\(", " " + head.group(2))
    if not opcode:
        return None
    op_name = re.search(r'op_name="([^"]*)"', line)
    return head.group(1), opcode.group(1), op_name.group(1) if op_name else "", line


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """{instruction name: (opcode, op_name metadata, HLO line)} of a compiled module.

    A fusion that contains a convolution or a matrix product is described by that operation
    (its metadata and dimension labels), since it is what the fusion spends its time on.
    """
    computations, current, found = {}, None, {}
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
            continue
        parsed = _parse_line(line)
        if parsed:
            found[parsed[0]] = parsed[1:]
            if current is not None:
                current.append(parsed)
    for name, (opcode, _, line) in list(found.items()):
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if opcode != "fusion" or not called:
            continue
        heavy = [x for x in computations.get(called.group(1), []) if x[1] in ("convolution", "dot")]
        if heavy:
            found[name] = heavy[0][1:]
    return found


def _conv_category(op_name: str, line: str) -> str:
    if "transpose(" not in op_name:
        return CATEGORIES[0]
    # XLA's own backward convolutions: a weight gradient's output is the kernel
    # (dim_labels '...->01io'-like: spatial dimensions first).
    output = re.search(r"dim_labels=\S*->(\w+)", line)
    return CATEGORIES[2] if output and output.group(1).startswith("01") else CATEGORIES[1]


# (test on (name, opcode, op_name), category), first match wins.
_RULES = (
    (lambda n, o, op: "conv_weight_grad" in op, CATEGORIES[2]),
    (lambda n, o, op: "conv_input_grad" in op, CATEGORIES[1]),
    (lambda n, o, op: "/optimizer/" in op or op.endswith("/optimizer"), CATEGORIES[5]),
    (lambda n, o, op: bool(re.search(r"\bresize\b", op)), CATEGORIES[4]),
    (lambda n, o, op: bool(re.search(r"/bn\w*/", op)) or "batch_norm" in op.lower(), CATEGORIES[3]),
    (
        lambda n, o, op: o in ("copy", "transpose") or bool(re.search("copy|transpose", n)),
        CATEGORIES[6],
    ),
    (lambda n, o, op: o == "dot" or "dot_general" in op, CATEGORIES[7]),
)


def category(name: str, opcode: str, op_name: str, line: str) -> str:
    """The `CATEGORIES` entry of one HLO instruction."""
    fast_backward = "conv_weight_grad" in op_name or "conv_input_grad" in op_name
    native = opcode == "convolution" or "conv_general_dilated" in op_name.rsplit("/", 1)[-1]
    if native and not fast_backward:
        return _conv_category(op_name, line)
    for test, kind in _RULES:
        if test(name, opcode, op_name):
            return kind
    return CATEGORIES[8]


def _durations(trace_dir: str, names) -> collections.Counter:
    """{instruction name: total microseconds} from the profiler's perfetto trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            totals[event["name"]] += float(event.get("dur", 0.0))
    return totals


def _short(op_name: str) -> str:
    return re.sub(r"^jit\(\w+\)/", "", op_name)[-90:]


def profile(args) -> str:
    import jax

    from benchmarks import speed_benchmark as bench
    from jaxda import mesh as mesh_lib
    from jaxda.train import trainer

    config = bench.config_of(args)
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    state = trainer.init_state(config, setup)
    source, label, target = bench.inputs(args, (args.height, args.width))
    batch = mesh_lib.to_global(
        {"source": {"image": source, "label": label}, "target": {"image": target}}, mesh
    )
    compiled = trainer.jit_train_step(config, setup).lower(state, batch).compile()
    instructions = hlo_instructions(compiled.as_text())
    state, metrics = compiled(state, batch)  # Warm-up.
    jax.block_until_ready(metrics)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="jaxda_profile_")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    jax.profiler.stop_trace()
    totals = _durations(trace_dir, instructions)
    per_category = collections.Counter()
    for name, micros in totals.items():
        per_category[category(name, *instructions[name])] += micros / 1e3 / args.steps
    all_ms = sum(per_category.values())
    lines = [
        f"{args.model} train step {args.height}x{args.width}, --impl={args.impl}, "
        f"{args.threads} threads: wall {wall_ms:.0f} ms per step, operations {all_ms:.0f} ms "
        f"({len(totals)} operations)",
        "",
        "| operations | ms per step | share |",
        "|---|---|---|",
    ]
    for name in CATEGORIES:
        ms = per_category.get(name, 0.0)
        lines.append(f"| {name} | {ms:.0f} | {100 * ms / all_ms:.1f}% |")
    lines += ["", f"Top {args.top} operations, and of each category outside convolutions:"]
    lines += ["", "| ms per step | category | op |", "|---|---|---|"]
    ranked = [(name, category(name, *instructions[name])) for name, _ in totals.most_common()]
    shown = ranked[: args.top] + [
        item
        for kind in CATEGORIES[3:]
        for item in [x for x in ranked[args.top :] if x[1] == kind][: args.top_per_category]
    ]
    for name, kind in shown:
        opcode, op_name, _ = instructions[name]
        ms = totals[name] / 1e3 / args.steps
        lines.append(f"| {ms:.1f} | {kind} | {opcode} {_short(op_name)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="deeplab_v2", choices=("deeplab_v2", "deeplabv3plus"))
    parser.add_argument("--depth", type=int, default=None, choices=(50, 101))
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--impl", default="fast", help="As speed_benchmark's --impls entries.")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--top_per_category", type=int, default=4)
    parser.add_argument("--trace_dir", default=None, help="Keep the trace here (TensorBoard).")
    args = parser.parse_args()
    os.sched_setaffinity(0, range(args.threads))  # Before XLA sizes its thread pool.
    sys.path.insert(0, _ROOT)
    from benchmarks import speed_benchmark as bench

    args.depth = args.depth or bench.MODELS[args.model][1]
    entry = bench.parse_impl(args.impl)
    args.conv_impl, args.remat, args.dtype = entry.conv_impl, entry.remat, entry.dtype
    args.block_barrier, flags = entry.block_barrier, entry.xla_flags
    if flags:
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), flags]))
    print(profile(args))


if __name__ == "__main__":
    main()
