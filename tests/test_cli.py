"""`jaxda.cli`: expected errors print their message alone, bugs keep their traceback, and the
start of a command is quiet. Subprocess tests start the real commands as a new user would."""

import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from jaxda import cli
from jaxda.data import subsets

# ml_collections loads config files with importlib's deprecated load_module.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What TensorFlow, JAX and TFDS print at start-up unless told otherwise.
BANNERS = (
    "oneDNN custom operations",
    "absl::InitializeLog",
    "cpu_feature_guard",
    "This TensorFlow binary is optimized",
    "Unable to initialize backend",
    "Downloading and preparing dataset",
    "downloaded and prepared",
    "Generating splits",
    "has no dataset_info.json",
)


def _launch(args, tmp_path, **env):
    """Runs `python ARGS` from the repository root as a user would, with an empty TFDS dir."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAXDA_", "TF_CPP_"))}
    clean.pop("XLA_FLAGS", None)  # The test session's fake devices.
    clean.update(TFDS_DATA_DIR=str(tmp_path / "tfds"), JAX_PLATFORMS="cpu", **env)
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _assert_quiet(result):
    for banner in BANNERS:
        assert banner not in result.stdout + result.stderr, banner


def test_cli_imports_neither_tensorflow_nor_jax():
    code = "import sys, jaxda.cli; print(sorted({'tensorflow', 'jax'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.slow  # ~15 s; by default: test_unknown_config_key_names_the_key (the same quiet
# start and one-message exit), test_folder_builder's not-prepared message.
def test_dataset_not_prepared_is_one_message_after_a_quiet_start(tmp_path):
    args = ["-m", "launch.main", "--config=configs/adaptseg.py", f"--workdir={tmp_path / 'w'}"]
    result = _launch(args, tmp_path)
    assert result.returncode != 0
    assert "launch.main: error: Dataset 'gta5' is not prepared" in result.stderr
    assert "python -m launch.prepare --dataset=gta5" in result.stderr
    assert "Traceback" not in result.stderr
    assert "JAX devices: " in result.stderr  # jaxda's own logging still shows.
    _assert_quiet(result)
    shown = _launch([*args, "--traceback"], tmp_path)
    assert shown.returncode != 0
    assert "Traceback" in shown.stderr and "DatasetNotPreparedError" in shown.stderr


def test_unknown_config_key_names_the_key(tmp_path):
    config = "--config=configs/adaptseg.py:synthetic"
    args = ["-m", "launch.main", config, "--workdir=/nowhere", "--config.unknown_key=1"]
    result = _launch(args, tmp_path)
    assert result.returncode != 0
    assert "launch.main: error: flag --config.unknown_key:" in result.stderr
    assert "Traceback" not in result.stderr


# Slow run (8 s): the one-line error of a command is checked by the default run with
# launch.main; this is the same for launch.convert.
@pytest.mark.slow
def test_convert_names_a_missing_file(tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("needs PyTorch")
    missing, out = tmp_path / "missing.pth", tmp_path / "out"
    args = ["-m", "launch.convert", f"--from={missing}", "--config=configs/adaptseg.py"]
    result = _launch([*args, f"--out={out}"], tmp_path)
    assert result.returncode != 0
    assert "launch.convert: error:" in result.stderr and str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_building_the_built_in_dataset_is_quiet(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(
        "import sys\n"
        "from jaxda import cli\n"
        "cli.quiet_start()\n"
        "from jaxda.data import sources\n"
        "def main(argv):\n"
        "    sources.get_builder('synthetic_shift/tiny', sys.argv[1])\n"
        "cli.run(main, argv=sys.argv[:1])\n"
    )
    result = _launch([str(script), str(tmp_path / "tfds")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Generating the built-in dataset synthetic_shift/tiny" in result.stderr
    assert result.stdout == ""
    _assert_quiet(result)


# In-process: the wrapper and the classification.


def _raises(error):
    raise error


def _raised(function, *args) -> BaseException:
    try:
        function(*args)
    except Exception as e:
        return e
    raise AssertionError("nothing raised")


def test_jaxda_errors_and_deliberate_value_errors_are_expected():
    assert cli.is_expected(_raised(subsets.load, "no-such-subset"))  # A jaxda class.
    assert cli.is_expected(_raised(_raises, cli.CommandError("bad")))
    assert cli.is_expected(_raised(_raises, ValueError("config.x must be > 0")))
    assert cli.is_expected(_raised(open, "/no/such/file"))  # An OSError naming its file.


def test_bugs_are_not_expected():
    assert not cli.is_expected(_raised(_raises, KeyError("x")))
    assert not cli.is_expected(_raised(_raises, TypeError("x")))
    assert not cli.is_expected(_raised(int, "x"))  # A ValueError no `raise` of ours made.
    assert not cli.is_expected(_raised(json.loads, "{"))  # One from inside a library.
    assert not cli.is_expected(ValueError("never raised"))


def test_guard_prints_expected_errors_alone(capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    guarded = cli.guard(lambda argv: _raises(ValueError("Use --config.x=1.")), "prog")
    with pytest.raises(SystemExit) as exit_info:
        guarded(["prog"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "prog: error: Use --config.x=1.\n"
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="Use --config"):
        guarded(["prog"])


def test_guard_keeps_unexpected_errors(monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    with pytest.raises(KeyError):
        cli.guard(lambda argv: {}["missing"], "prog")(["prog"])
    assert cli.guard(lambda argv: 3, "prog")(["prog"]) == 3


def test_flags_are_read_before_parsing(monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.traceback_requested(["p", "--traceback"])
    assert cli.traceback_requested(["p", "-traceback=true"])
    assert not cli.traceback_requested(["p", "--traceback=false"])
    assert not cli.traceback_requested(["p", "--traceback", "--notraceback"])
    assert not cli.traceback_requested(["p", "--", "--traceback"])
    assert not cli.verbose_requested(["p", "--verbosity=1"])
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    assert cli.traceback_requested(["p"])


def test_library_info_records_are_dropped_warnings_kept():
    def record(path, level, msg="m"):
        return logging.LogRecord("absl", level, path, 1, msg, None, None)

    assert not cli._quiet_record(record("/x/orbax/checkpoint/a.py", logging.INFO))
    assert not cli._quiet_record(record("/x/jax/_src/xla_bridge.py", logging.INFO))
    assert cli._quiet_record(record("/x/orbax/checkpoint/a.py", logging.WARNING))
    assert cli._quiet_record(record("/x/jaxda/data/sources.py", logging.INFO))
    tfds_noise = "Variant folder %s has no %s"
    assert not cli._quiet_record(record("/x/tensorflow_datasets/f.py", logging.WARNING, tfds_noise))


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    if arg == 'bad':\n"
        "        raise ValueError(f'Unknown config argument {arg!r}')\n"
        "    if arg == 'bug':\n"
        "        return {}['bug']\n"
        "    return ml_collections.ConfigDict({'total_steps': 1})\n"
    )
    return str(path)


def _parse(argv):
    """cli's flag parsing of `argv` with a config flag, on flags of its own."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values, sys_argv=argv)
    return cli._parse_flags(argv, "prog", flag_values)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (":bad", "prog: error: flag --config={path}:bad: Unknown config argument 'bad'\n"),
        (
            " --config.total_step=2",
            'prog: error: flag --config.total_step: the config has no such field. Did you mean '
            '"total_steps" instead of "total_step"?\n',
        ),
        ("-gone.py", "prog: error: flag --config={path}-gone.py: cannot load the config file: "
         "no such file\n"),
    ],
    ids=["config argument", "unknown field", "missing file"],
)  # fmt: skip
def test_config_flag_errors_are_one_line(capsys, monkeypatch, config_file, flag, message):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit):
        _parse(["prog", *f"--config={config_file}{flag}".split()])
    assert capsys.readouterr().err == message.format(path=config_file)


def test_config_bugs_keep_their_traceback(monkeypatch, config_file):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    with pytest.raises(KeyError):
        _parse(["prog", f"--config={config_file}:bug"])
    assert _parse(["prog", f"--config={config_file}", "rest"]) == ["prog", "rest"]
