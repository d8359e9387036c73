"""Shared command-line support for `launch.*`: a quiet start and clean expected errors.

  from jaxda import cli
  cli.quiet_start()  # First, before anything imports TensorFlow or JAX.
  ...
  if __name__ == "__main__":
      cli.run(main)  # Instead of absl.app.run(main).

An expected error (a dataset not prepared, a bad flag or config value, an unusable file or
checkpoint) is printed as `PROG: error: MESSAGE` and exits with status 1; any other exception is
a bug and keeps its traceback. `--traceback` (or JAXDA_TRACEBACK=1) shows the traceback of
expected errors too; `--verbose` (or JAXDA_VERBOSE=1) lets TensorFlow's, JAX's and TFDS's
start-up messages and progress bars through. This module imports neither TensorFlow nor JAX:
the environment it sets must be in place before they load.
"""

import contextlib
import functools
import linecache
import logging as std_logging
import os
import re
import sys
import sysconfig
import threading
import traceback as traceback_lib
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags, logging
from ml_collections.config_flags.config_flags import is_config_flag

TRACEBACK_ENV = "JAXDA_TRACEBACK"
VERBOSE_ENV = "JAXDA_VERBOSE"

# TensorFlow 2.21 writes these at import, before it applies TF_CPP_MIN_LOG_LEVEL.
_TF_IMPORT_BANNERS = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called|"
    r"oneDNN custom operations are on|"
    r"This TensorFlow binary is optimized to use available CPU instructions|"
    r"rebuild TensorFlow with the appropriate compiler flags|"
    r"Unable to register cu(DNN|FFT|BLAS) factory|"
    r"TF-TRT Warning: Could not find TensorRT"
)
# Library INFO records that say nothing the user acts on (orbax's per-save notes, TFDS's build
# steps, JAX's TPU probe); their warnings and errors still show.
_QUIET_INFO_FROM = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")
_NOISE = re.compile(
    r"Variant folder .* has no |"  # TFDS on a dataset not built yet; jaxda reports that itself.
    r"Platform '.*' is experimental"
)

_JAXDA_DIR = os.path.dirname(os.path.abspath(__file__))
_PROJECT_DIRS = tuple(
    d + os.sep for d in (_JAXDA_DIR, os.path.join(os.path.dirname(_JAXDA_DIR), "configs"))
)
_LIBRARY_DIRS = tuple(
    {os.path.abspath(sysconfig.get_path(key)) for key in ("stdlib", "platstdlib", "purelib")}
)
_CONFIG_PARSE_ERROR = ": Error whilst parsing config file:"


class CommandError(Exception):
    """An error a command reports by its message alone (for errors of other libraries)."""


def _argv_flag(name: str, env: str, argv: Sequence[str] | None = None) -> bool:
    """Whether --name is on the command line (read before absl parses it) or $env is set."""
    value = os.environ.get(env, "").lower() in ("1", "true", "yes")
    for arg in (sys.argv if argv is None else argv)[1:]:
        if arg == "--":
            break
        key, _, text = arg.lstrip("-").partition("=")
        if arg.startswith("-") and key == name:
            value = text.lower() not in ("0", "false", "no") if text else True
        elif arg.startswith("-") and key == f"no{name}":
            value = False
    return value


def traceback_requested(argv: Sequence[str] | None = None) -> bool:
    """--traceback or JAXDA_TRACEBACK=1: expected errors keep their traceback."""
    return _argv_flag("traceback", TRACEBACK_ENV, argv)


def verbose_requested(argv: Sequence[str] | None = None) -> bool:
    """--verbose or JAXDA_VERBOSE=1: nothing is hidden."""
    return _argv_flag("verbose", VERBOSE_ENV, argv)


def _define_flags() -> None:
    # Registered under the main module, so --helpshort lists them with the command's own flags.
    for name, help_text in (
        ("traceback", f"Show the Python traceback of expected errors too (or {TRACEBACK_ENV}=1)."),
        (
            "verbose",
            "Let TensorFlow's, JAX's and TFDS's start-up messages and progress bars through "
            f"(or {VERBOSE_ENV}=1).",
        ),
    ):
        if name not in flags.FLAGS:
            flags.DEFINE_bool(name, False, help_text, module_name=sys.argv[0])


def _quiet_record(record: std_logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    if record.levelno < std_logging.WARNING and any(p in path for p in _QUIET_INFO_FROM):
        return False
    return not _NOISE.search(str(record.msg))


@contextlib.contextmanager
def _stderr_without(pattern: re.Pattern):
    """Drops the lines matching `pattern` that anything, C++ included, writes to fd 2 meanwhile."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # No usable stderr: nothing to drop.
        yield
        return
    read_fd, write_fd = os.pipe()

    def forward():
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                if not pattern.search(line.decode(errors="replace")):
                    os.write(saved, line)

    # A thread forwards lines as they come, so output before a crash still shows.
    thread = threading.Thread(target=forward, daemon=True)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # Closes the pipe's last write end: the thread reads to the end.
        thread.join(timeout=10)
        os.close(saved)


def _quiet_tfds(progress: bool) -> None:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import dataset_builder

    if not progress:
        tfds.disable_progress_bar()
    # TFDS prints these ("Downloading and preparing dataset Unknown size ...") to stdout, where
    # the results go; jaxda logs its own line instead.
    for name in ("_log_download_bytes", "_log_download_done"):
        if hasattr(dataset_builder.DatasetBuilder, name):
            setattr(dataset_builder.DatasetBuilder, name, lambda self: None)


def quiet_start(*, tfds_progress: bool = False) -> None:
    """Hides TensorFlow's, JAX's and TFDS's start-up chatter, unless --verbose.

    Call it first in a command's module, before anything imports TensorFlow or JAX. Also
    defines --traceback and --verbose. Variables already in the environment are kept.

    Args:
      tfds_progress: keep TFDS's progress bars (for `launch.prepare`, where building a dataset
        is the task).
    """
    _define_flags()
    if verbose_requested():
        return
    # Hides C++ INFO lines of TensorFlow and XLA (CPU-feature notes, XLA service start-up);
    # their warnings and errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    logging.get_absl_handler().addFilter(_quiet_record)
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0" and "tensorflow" not in sys.modules:
        with _stderr_without(_TF_IMPORT_BANNERS):
            import tensorflow  # noqa: F401
    _quiet_tfds(tfds_progress)


def _project_frame(filename: str) -> bool:
    """Whether code in `filename` is jaxda's, a config's or a command's, not a library's."""
    path = os.path.abspath(filename)
    if path.startswith(_PROJECT_DIRS):
        return True
    parts = path.split(os.sep)
    return not (
        filename.startswith("<")
        or path.startswith(_LIBRARY_DIRS)
        or "site-packages" in parts
        or "dist-packages" in parts
    )


def _innermost(error: BaseException):
    frames = list(traceback_lib.walk_tb(error.__traceback__))
    return frames[-1] if frames else (None, 0)


def _raised_deliberately(error: BaseException) -> bool:
    """Whether a `raise` statement in project code (jaxda, configs, the command) raised it."""
    frame, lineno = _innermost(error)
    if frame is None:
        return False
    filename = frame.f_code.co_filename
    line = linecache.getline(filename, lineno).strip()
    return _project_frame(filename) and line.startswith("raise")


def raised_in(error: BaseException, path_suffix: str) -> bool:
    """Whether `error` was raised in a file whose path ends with `path_suffix` ('a/b.py')."""
    frame, _ = _innermost(error)
    return frame is not None and frame.f_code.co_filename.replace(os.sep, "/").endswith(path_suffix)


def is_expected(error: BaseException) -> bool:
    """Whether `error` is one whose message tells the user what to do (no traceback needed).

    Every exception class jaxda defines is (DatasetNotPreparedError, ManualDataError,
    CheckpointMismatchError, ConversionError, CommandError, ...); so is a ValueError, OSError
    or ImportError that project code (jaxda, a config, a command) raises itself, e.g. config
    validation, and an OSError naming a file. Other exceptions (KeyError, TypeError, a
    ValueError from inside a library, ...) are bugs.
    """
    if any(cls.__module__.startswith("jaxda.") for cls in type(error).__mro__):
        return True
    if isinstance(error, OSError) and error.filename is not None:
        return True
    return isinstance(error, (ValueError, OSError, ImportError)) and _raised_deliberately(error)


def fail(prog: str, message: str) -> NoReturn:
    """Prints `PROG: error: MESSAGE` to stderr and exits with status 1."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    sys.exit(1)


def _message(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _chain(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _config_parse_locals(error: BaseException) -> dict:
    """The locals of ml_collections' config-flag parser in `error`'s traceback, or {}."""
    for frame, _ in reversed(list(traceback_lib.walk_tb(error.__traceback__))):
        local = frame.f_locals
        if "argument" in local and is_config_flag(local.get("self")):
            return local
    return {}


def _unusable_config(name: str, argument: str, error: BaseException) -> str:
    path = argument.split(":", 1)[0]
    if os.path.exists(path):
        reason = _message(error)
    else:
        reason = "no such file" + ("" if os.path.isabs(path) else f" (in {os.getcwd()})")
    return f"flag --{name}={argument}: cannot load the config file: {reason}"


def _flag_error_message(error: Exception) -> str | None:
    """The message for an error raised while parsing flags, or None for a bug."""
    if isinstance(error, flags.Error):
        text = str(error)
        if _CONFIG_PARSE_ERROR in text:  # get_config raised; ml_collections wraps its traceback.
            cause = _chain(error)[-1]
            return (
                f"{text.partition(_CONFIG_PARSE_ERROR)[0]}: {cause}" if is_expected(cause) else None
            )
        return f"{text}\nPass --helpshort or --helpfull to see help on flags."
    local = _config_parse_locals(error)
    if not local:
        return None
    name = local["self"].name
    if isinstance(error, OSError):  # An override of a config file that failed to load.
        return _unusable_config(name, local["argument"], error.__cause__ or error)
    if isinstance(error, (KeyError, AttributeError)) and "field_path" in local:
        # An override of a field the config lacks; ml_collections says only the key.
        hints = [
            str(e.args[0]) for e in _chain(error) if e.args and "Did you mean" in str(e.args[0])
        ]
        hint = f" {hints[-1].splitlines()[-1]}" if hints else ""
        return f"flag --{name}.{local['field_path']}: the config has no such field.{hint}"
    return None


def _parse_flags(argv: list[str], prog: str, flag_values=flags.FLAGS) -> list[str]:
    """absl's flag parsing, with flag and config errors reported by their message alone."""
    try:
        remaining = flag_values(argv)
    except Exception as error:
        message = None if traceback_requested(argv) else _flag_error_message(error)
        if message is None:
            raise
        fail(prog, message)
    if not traceback_requested(argv):
        # ml_collections defers a config file's load error to the config's first use.
        for name in flag_values:
            flag = flag_values[name]
            if is_config_flag(flag) and type(flag.value).__name__ == "_ErrorConfig":
                fail(prog, _unusable_config(name, flag.config_filename, vars(flag.value)["_error"]))
    return remaining


def _show_traceback() -> bool:
    parsed = flags.FLAGS.is_parsed() and "traceback" in flags.FLAGS
    return traceback_requested() or (parsed and flags.FLAGS.traceback)


def guard(main: Callable, prog: str) -> Callable:
    """`main`, with expected errors printed by their message alone (see `is_expected`)."""

    @functools.wraps(main)
    def guarded(argv):
        try:
            return main(argv)
        except Exception as error:
            if _show_traceback() or not is_expected(error):
                raise
            fail(prog, _message(error))

    return guarded


def _prog_name() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def run(main: Callable, argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """`absl.app.run(main)`, with expected errors and flag errors reported without traceback."""
    _define_flags()
    prog = prog or _prog_name()
    app.run(
        guard(main, prog),
        argv=None if argv is None else list(argv),
        flags_parser=functools.partial(_parse_flags, prog=prog),
    )
