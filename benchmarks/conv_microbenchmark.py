"""Per-convolution weight-gradient (dW) microbenchmark: XLA's own vs `jaxda.models.fast_conv`'s.

Run through `python benchmarks/speed_benchmark.py --convs [--model=...] [--height --width]`.
The convolutions are those of the benchmark's train step (the segmentation network at
--height x --width, batch 1, and the output-space discriminator on its upsampled 19-class
output), read from the step's jaxpr, one row per distinct shape with its count per step. Each
dW is timed alone (`jax.jit`, median of --conv_reps, the methods interleaved so that machine
noise hits all alike): XLA's ('xla'), the 1x1 dot, and for k x k kernels 'taps', 'xcol' and
(stride 1) 'dycol', 'dytaps'; 'auto' is the method `fast_conv.choose_method` picks.
"""

import collections
import functools
import statistics
import time

import numpy as np

KXK_METHODS = ("taps", "xcol", "dycol", "dytaps")


def _walk(jaxpr, found: collections.Counter) -> None:
    """Counts the conv_general_dilated equations of `jaxpr` and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            p = eqn.params
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            key = (
                tuple(lhs), tuple(rhs), tuple(p["window_strides"]),
                tuple(tuple(x) for x in p["padding"]), tuple(p["rhs_dilation"]),
            )  # fmt: skip
            found[key] += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _walk(inner, found)


def step_convs(args, config) -> collections.Counter:
    """{(x shape, kernel shape, strides, padding, dilation): dW count per train step}: the
    segmentation network's (source and target) and the discriminators' (2 discriminators,
    each trained on source and target)."""
    import jax
    import jax.numpy as jnp

    from jaxda import models

    config.model.conv_impl = "xla"  # Native convolutions: plain conv equations in the jaxpr.
    image = jax.ShapeDtypeStruct((1, args.height, args.width, 3), jnp.float32)
    seg = models.build_segmenter(config.model, 19)
    jaxpr = jax.make_jaxpr(lambda v, x: seg.apply(v, x, train=True, mutable=["batch_stats"]))(
        models.abstract_variables(seg), image
    )
    seg_convs = collections.Counter()
    _walk(jaxpr.jaxpr, seg_convs)
    disc = models.build_discriminator(config.discriminator)
    probs = jax.ShapeDtypeStruct((1, args.height, args.width, 19), jnp.float32)
    jaxpr = jax.make_jaxpr(disc.apply)(models.abstract_variables(disc, 19), probs)
    disc_convs = collections.Counter()
    _walk(jaxpr.jaxpr, disc_convs)
    found = collections.Counter()
    for key, count in seg_convs.items():
        found[key] += 2 * count
    for key, count in disc_convs.items():
        found[key] += 4 * count  # The generator's adversarial loss needs no D weight gradient.
    return found


def _time_interleaved(fns: dict, args_tuple, reps: int) -> dict[str, float]:
    import jax

    times = {name: [] for name in fns}
    for fn in fns.values():
        jax.block_until_ready(fn(*args_tuple))  # Warm-up.
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args_tuple))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _describe(key) -> str:
    x, w, strides, _, dilation = key
    extra = (f" s{strides[0]}" if strides != (1, 1) else "") + (
        f" d{dilation[0]}" if dilation != (1, 1) else ""
    )
    return f"{w[0]}x{w[1]}{extra} {w[2]}->{w[3]} @{x[1]}x{x[2]}"


def run(args, config) -> str:
    """Times every distinct conv's dW; returns the table to print."""
    import jax
    import jax.numpy as jnp

    from jaxda.models import fast_conv

    convs = step_convs(args, config)
    rng = np.random.default_rng(0)
    rows, totals = [], collections.Counter()
    for key, count in sorted(convs.items(), key=lambda kv: -np.prod(kv[0][1]) * kv[0][0][1]):
        x_shape, w_shape, strides, padding, dilation = key
        spec = fast_conv.ConvSpec(strides, padding, dilation)
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        kernel = jax.ShapeDtypeStruct(w_shape, jnp.float32)
        out_shape = jax.eval_shape(functools.partial(fast_conv._native, spec=spec), x, kernel).shape
        dy = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
        one = w_shape[:2] == (1, 1)
        methods = ["xla", "auto"] if one else ["xla", *KXK_METHODS]
        if not one and strides != (1, 1):
            methods = [m for m in methods if m not in ("dycol", "dytaps")]
        fns = {
            m: jax.jit(
                functools.partial(
                    fast_conv.weight_gradient, kernel_shape=w_shape, spec=spec, method=m
                )
            )
            .lower(x, dy)
            .compile()
            for m in methods
        }
        med = _time_interleaved(fns, (x, dy), args.conv_reps)
        auto = "dot" if one else fast_conv.choose_method(x_shape, w_shape, spec)
        med_auto = med["auto"] if one else med[auto]
        gflop = fast_conv.conv_flops(w_shape, out_shape) / 1e9
        totals["xla"] += count * med["xla"]
        totals["auto"] += count * med_auto
        totals["best"] += count * min(med.values())
        if one:
            cells = f"{med['auto'] * 1e3:.1f} ({med['xla'] / med['auto']:.2f}x) | - | - | -"
        else:
            cells = " | ".join(
                f"{med[m] * 1e3:.1f} ({med['xla'] / med[m]:.2f}x)" if m in med else "-"
                for m in KXK_METHODS
            )
        rows.append(
            f"| {_describe(key)} | {count} | {med['xla'] * 1e3:.1f} | {cells} | {auto} "
            f"| {gflop / med['xla']:.0f} | {gflop / med_auto:.0f} |"
        )
    header = (
        "| conv (kernel, stride, dilation, C->K, input map) | count | XLA dW ms | taps (1x1: dot) "
        "ms (XLA / it) | xcol ms | dycol ms | dytaps ms | auto | XLA GFLOP/s | auto GFLOP/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    summary = (
        f"dW per train step (count x median): XLA {totals['xla']:.3f} s, auto "
        f"{totals['auto']:.3f} s ({totals['xla'] / totals['auto']:.2f}x), fastest method per "
        f"shape {totals['best']:.3f} s ({totals['xla'] / totals['best']:.2f}x)"
    )
    return f"{header}\n" + "\n".join(rows) + f"\n\n{summary}"
