"""Test setup: 8 fake CPU devices (set before JAX starts) and a tiny built-in dataset."""

import os

# Must happen before anything imports jax: multi-device behaviour is tested on fake devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import pytest

# Tests run a few steps of tiny networks: compile time dominates, so trade run-time speed for
# much faster XLA compilation. Results stay deterministic.
jax.config.update("jax_disable_most_optimizations", True)

TINY_DATASET = "synthetic_shift/tiny"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir holding the tiny synthetic benchmark (built once per session)."""
    from jaxda.data import sources

    path = str(tmp_path_factory.mktemp("tfds"))
    sources.get_builder(TINY_DATASET, path)
    return path


def tiny_config(method: str = "adaptseg", data_dir: str = "", **overrides):
    """A config of `method` on the tiny dataset with a very small network (for tests only)."""
    from configs import adaptseg, oracle, source_only

    module = {"adaptseg": adaptseg, "source_only": source_only, "oracle": oracle}[method]
    config = module.get_config("synthetic")
    for stream in ("source", "target", "eval"):
        config.data[stream].name = TINY_DATASET
    if method == "oracle":
        config.data.source.split = "target_train"
    config.data.data_dir = data_dir
    config.model.width = 4
    config.discriminator.width = 4
    config.batch_size = 8
    config.data.eval.batch_size = 8
    config.num_devices = 1
    config.total_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def shrink_to_tiny(config, data_dir: str, crop=(32, 64)):
    """A `:synthetic` config moved onto the tiny dataset (images `crop`) with a very small
    network: width 4, one device, 4 steps, logging, evaluation and checkpoints every 2."""
    for stream in ("source", "target", "eval"):
        config.data[stream].name = TINY_DATASET
    for stream in (config.data.source, config.data.target):
        stream.size = stream.crop_size = crop
    config.data.data_dir = data_dir
    config.data.eval.batch_size = config.offline.batch_size = 8
    config.model.width = 4
    config.num_devices = 1
    config.total_steps = 4
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    return config


# The longest test files, started first: with two workers taking a file at a time, a long file
# left for the end runs alone while the other worker idles (measured: the last 9% of a run took
# a third of its time). Relative to the tests/ directory.
LONGEST_FILES = (
    "test_multihost.py",
    "train/test_trainer.py",
    "train/test_dacs.py",
    "train/test_steps.py",
    "methods/test_robustnet.py",
    "methods/test_dasac.py",
    "train/test_adaptation_methods.py",
    "models/test_hrda.py",
    "test_own_data.py",
    "test_real_datasets_run.py",
)


def pytest_collection_modifyitems(config, items):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}

    def order(item):
        path = str(item.path)
        name = path[len(root) :] if path.startswith(root) else path
        return rank.get(name, len(rank))

    items.sort(key=order)  # Stable: the other files keep their order.
