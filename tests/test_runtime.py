"""jaxda.runtime: the process-wide settings of a config (XLA flags, matmul precision)."""

import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from configs import common
from jaxda import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_follow_the_config_and_are_added_once(monkeypatch):
    c = common.base_config()
    assert (c.deterministic_gpu_ops, c.cpu_memory_scheduler, c.matmul_precision) == (
        True, False, "default",
    )  # fmt: skip
    assert runtime.xla_flags(c) == [runtime.DETERMINISTIC_GPU_FLAG]
    c.cpu_memory_scheduler = True
    c.deterministic_gpu_ops = False
    assert runtime.xla_flags(c) == [runtime.CPU_MEMORY_SCHEDULER_FLAG]
    c.deterministic_gpu_ops = True
    monkeypatch.setenv("XLA_FLAGS", f"--xla_dump_to=/tmp/x {runtime.DETERMINISTIC_GPU_FLAG}")
    previous = jax.config.jax_default_matmul_precision
    try:
        c.matmul_precision = "highest"
        runtime.apply(c)
        assert jax.config.jax_default_matmul_precision == "highest"
    finally:
        jax.config.update("jax_default_matmul_precision", previous)
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_dump_to=/tmp/x", runtime.DETERMINISTIC_GPU_FLAG, runtime.CPU_MEMORY_SCHEDULER_FLAG,
    ]  # fmt: skip
    # A config without the keys (an older run's) asks for nothing.
    assert runtime.xla_flags(ml_collections.ConfigDict()) == []


def test_unknown_precision_names_the_key():
    c = ml_collections.ConfigDict({"matmul_precision": "fp19"})
    with pytest.raises(ValueError, match=r"config\.matmul_precision='fp19'.*'float32'"):
        runtime.apply(c)


_TEMP_BYTES = """
import jax, jax.numpy as jnp
from jax import lax
from jaxda import runtime
import ml_collections
runtime.apply(ml_collections.ConfigDict({"cpu_memory_scheduler": MEMSCHED}))

def net(ws, x):
    for w in ws:
        x = jax.nn.relu(lax.conv_general_dilated(x, w, (1, 1), "SAME",
                        dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return jnp.sum(x ** 2)

ws = [jnp.ones((3, 3, 32, 32))] * 6
x = jnp.ones((2, 64, 64, 32))
compiled = jax.jit(jax.grad(net)).lower(ws, x).compile()
print("TEMP", compiled.memory_analysis().temp_size_in_bytes)
"""


def _temp_bytes(memsched: bool) -> int:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    code = _TEMP_BYTES.replace("MEMSCHED", str(memsched))
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("TEMP")]
    return int(line.split()[1])


def test_memory_scheduler_reaches_xla_and_cuts_temporary_memory():
    """The flag applied before JAX starts changes XLA:CPU's buffer plan of a backward pass."""
    default, memory_optimized = _temp_bytes(False), _temp_bytes(True)
    assert memory_optimized < 0.9 * default, (memory_optimized, default)
