"""Multi-host training: 2 processes on localhost (gloo, 2 fake CPU devices each) train like 1
process with 4 devices (to float rounding), and a 2-process run SIGKILLed after a checkpoint
resumes to exactly the same end. Each process is a real `python -m launch.main` with the
distributed flags; the default test takes ~1.5 min on 2 cores, the kill-and-resume one (slow)
~2.5 min more."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from jaxda import checkpoints, distributed
from jaxda import mesh as mesh_lib
from jaxda.train import trainer
from tests.conftest import TINY_DATASET, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny_config run, with a loss logged every step and one evaluation, at the end.
OVERRIDES = {
    "num_devices": 4,
    "total_steps": 4,
    "log_every_steps": 1,
    "eval_every_steps": 4,
    "checkpoint_every_steps": 2,
}
LAUNCH_TIMEOUT = 240  # Seconds for both processes of one launch, imports and compiles included.
# A dead peer stops the other process after this long, instead of JAX's 100 s.
DISTRIBUTED_FLAGS = ["--distributed_init_timeout=60", "--distributed_heartbeat_timeout=30"]


def _config_flags(data_dir: str) -> list[str]:
    """--config.* flags that make configs/adaptseg.py:synthetic the tiny_config of OVERRIDES."""
    values = {
        **{f"data.{s}.name": TINY_DATASET for s in ("source", "target", "eval")},
        "data.data_dir": data_dir,
        "data.eval.batch_size": 8,
        "model.width": 4,
        "discriminator.width": 4,
        "batch_size": 8,
        **OVERRIDES,
    }
    return [f"--config.{k}={v}" for k, v in values.items()]


def _free_port() -> int:
    with socket.socket() as s:  # Another program may take it before the coordinator: rare.
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir: str, data_dir: str, log_dir) -> list[tuple[subprocess.Popen, str]]:
    """Starts the 2 processes of a run; returns (process, log path) of each."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",  # Not the session's 8.
        "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",  # As the session (conftest): fast compiles.
    }
    address = f"--coordinator_address=localhost:{_free_port()}"
    started = []
    for index in range(2):
        log = os.path.join(log_dir, f"{os.path.basename(workdir)}-{time.time():.0f}-{index}.log")
        command = [
            sys.executable, "-m", "launch.main", "--config=configs/adaptseg.py:synthetic",
            f"--workdir={workdir}", *_config_flags(data_dir), address,
            "--num_processes=2", f"--process_id={index}", *DISTRIBUTED_FLAGS,
        ]  # fmt: skip
        with open(log, "w") as f:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=f)
        started.append((process, log))
    return started


def _fail(started, reason: str):
    for process, _ in started:
        if process.poll() is None:
            process.kill()
            process.wait()
    logs = []
    for index, (process, log) in enumerate(started):
        with open(log) as f:
            text = f.read()
        logs.append(f"----- process {index} (rc {process.returncode}), {log}:\n{text[-6000:]}")
    pytest.fail(f"{reason}\n" + "\n".join(logs), pytrace=False)


def _finish(started) -> list[str]:
    """Waits for both processes (at most LAUNCH_TIMEOUT); their logs. Fails with both logs."""
    deadline = time.time() + LAUNCH_TIMEOUT
    for process, _ in started:
        try:
            process.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            _fail(started, f"the 2-process run took over {LAUNCH_TIMEOUT} s")
    if any(process.returncode for process, _ in started):
        _fail(started, "a process of the 2-process run failed")
    logs = []
    for _, log in started:
        with open(log) as f:
            logs.append(f.read())
    return logs


def _train_losses(workdir: str) -> dict[str, list[float]]:
    """{tag: value at steps 1, 2, ...} of the train/* scalars in the workdir's events; a step
    written again by a resumed run counts with its last value."""
    by_step = {}
    for name in sorted(os.listdir(workdir)):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
                for value in event.summary.value:
                    if value.tag.startswith("train/"):
                        by_step[value.tag, event.step] = float(tf.make_ndarray(value.tensor))
    tags = sorted({tag for tag, _ in by_step})
    steps = range(1, OVERRIDES["total_steps"] + 1)
    return {tag: [by_step[tag, step] for step in steps] for tag in tags}


def _final(workdir: str) -> dict:
    with open(os.path.join(workdir, trainer.RESULTS_FILE)) as f:
        final = json.load(f)["final"]
    final.pop("seconds")
    return final


def _final_params(workdir: str, data_dir: str):
    config = tiny_config(data_dir=data_dir)
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    variables, _ = checkpoints.restore_model_variables(
        checkpoints.find_step_dir(workdir),
        setup.abstract_state.model_variables(),
        checkpoints.model_meta(config.model),
    )
    return jax.tree.leaves(jax.device_get(variables))


@pytest.fixture(scope="module")
def started(data_dir, tmp_path_factory):
    """(workdir, processes) of an uninterrupted 2-process run, started."""
    workdir = str(tmp_path_factory.mktemp("two_processes"))
    processes = _start(workdir, data_dir, tmp_path_factory.getbasetemp())
    yield workdir, processes
    for process, _ in processes:  # A test that failed early leaves none running.
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def one_process(started, data_dir, tmp_path_factory):
    """The workdir of the same run in this process on 4 devices, trained while the 2-process
    run starts (its imports and compiles overlap this one's)."""
    workdir = str(tmp_path_factory.mktemp("one_process"))
    trainer.train_and_evaluate(tiny_config(data_dir=data_dir, **OVERRIDES), workdir)
    return workdir


@pytest.fixture(scope="module")
def two_processes(started):
    """(workdir, process logs) of the finished 2-process run."""
    workdir, processes = started
    return workdir, _finish(processes)


def test_two_processes_train_like_one_process_with_four_devices(one_process, two_processes):
    workdir, logs = two_processes
    for index, log in enumerate(logs):
        assert f"process {index} of 2" in log and "global devices 4" in log
    # The same global batches: equal up to float32 rounding. Each process compiles its own
    # program and sums in its own order (2 + 2 over gloo, or 4 of this session's 8 devices):
    # relative differences up to 5e-7 were seen in 4 steps, as between this run and 1 process
    # with 4 devices in a subprocess; a wrong batch or data order is off by far more.
    two_losses, one_losses = _train_losses(workdir), _train_losses(one_process)
    assert sorted(two_losses) == sorted(one_losses)
    assert len(one_losses["train/loss"]) == OVERRIDES["total_steps"]
    for tag, values in one_losses.items():
        np.testing.assert_allclose(two_losses[tag], values, rtol=1e-5, err_msg=tag)
    two, one = _final(workdir), _final(one_process)
    assert two["num_examples"] == one["num_examples"] == 16
    # The confusion matrix sums every process's examples; rounding never moved a prediction
    # here (identical), the tolerance only allows a handful of flipped pixels.
    assert two["miou"] == pytest.approx(one["miou"], abs=0.05)
    assert two["per_class_iou"] == pytest.approx(one["per_class_iou"], abs=0.05)
    # Only process 0 wrote files: one events file, no temporary leftovers.
    events = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]
    assert len(events) == 1
    assert not [n for n in os.listdir(workdir) if ".tmp" in n]


@pytest.mark.slow  # ~2 min: two more 2-process launches.
def test_two_processes_killed_after_a_checkpoint_resume_exactly(two_processes, data_dir, tmp_path):
    straight, _ = two_processes
    killed = str(tmp_path / "killed")
    started = _start(killed, data_dir, tmp_path)
    first_checkpoint = os.path.join(killed, checkpoints.CHECKPOINT_SUBDIR, "2")
    deadline = time.time() + LAUNCH_TIMEOUT
    while not os.path.isdir(first_checkpoint):
        if time.time() > deadline or any(p.poll() is not None for p, _ in started):
            _fail(started, "no checkpoint of step 2 appeared")
        time.sleep(0.02)
    for process, _ in started:
        process.send_signal(signal.SIGKILL)
    for process, _ in started:
        assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(killed, trainer.RESULTS_FILE))

    logs = _finish(_start(killed, data_dir, tmp_path))
    assert all("Resuming from step 2" in log for log in logs)
    assert _train_losses(killed) == _train_losses(straight)
    assert _final(killed) == _final(straight)
    for a, b in zip(
        _final_params(killed, data_dir), _final_params(straight, data_dir), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num_processes=2"], "--num_processes also needs --coordinator_address and"),
        (
            ["--coordinator_address=h:1", "--process_id=0"],
            "--coordinator_address, --process_id also need --num_processes",
        ),
        (
            ["--coordinator_address=h:1", "--num_processes=2", "--process_id=2"],
            "--process_id=2 must be in 0 .. --num_processes - 1 = 1",
        ),
        (
            ["--coordinator_address=h", "--num_processes=2", "--process_id=0"],
            "--coordinator_address=h must be HOST:PORT",
        ),
        (["--local_device_ids=0"], "--local_device_ids is for multi-host runs"),
        (["--distributed", "--local_device_ids=0,gpu1"], "must be device numbers"),
    ],
)
def test_incomplete_distributed_flags_are_named(args, message):
    values = flags.FlagValues()
    distributed.define_flags(values)
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        values(["prog", *args])


def test_distributed_flags_that_are_enough():
    for args in (
        [],
        ["--distributed"],  # JAX detects the rest (SLURM, Open MPI, TPU pods).
        ["--distributed", "--coordinator_address=h:1"],
        ["--coordinator_address=h:1", "--num_processes=2", "--process_id=1"],
    ):
        values = flags.FlagValues()
        distributed.define_flags(values)
        values(["prog", *args])
        assert distributed.requested(values) == bool(args)


def test_distributed_without_a_cluster_says_what_to_pass():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
    code = "from jaxda import distributed; distributed.initialize(init_timeout=5)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "No cluster environment JAX knows" in result.stderr
    assert "--coordinator_address=HOST:PORT --num_processes=N --process_id=I" in result.stderr
