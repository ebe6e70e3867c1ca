"""What every entry point shares: the config file flag and its overrides, and user errors
printed as one `error: ...` line.

    _CONFIG = cli.define_config_flag()
    def main(argv): config = cli.config_from_flag(_CONFIG); ...
    if __name__ == "__main__": cli.run(main)

A run with `checkpoint.init_from` takes its `model` group from that checkpoint (a fine-tuning
run cannot change its base's shapes), so its config file need not repeat the architecture;
a field left `None` in a config file (`ml_collections.config_dict.placeholder`) must be set
on the command line.

A `UserError` (a bad config, path, data file or checkpoint, a workdir in use, a full disk)
exits with status 2 and no traceback; Ctrl-C exits with 130; anything else is a bug and keeps
its traceback. The config file and the names of `--config.GROUP.FIELD=VALUE` overrides are
checked before absl and ml_collections parse them, so that their mistakes read like the
project's own errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import os
import re
import sys
import traceback
import warnings
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging
from etils import epath
from ml_collections import config_flags

from minids_jax import config as config_lib
from minids_jax import workdir as workdir_lib
from minids_jax.config import compat
from minids_jax.errors import UserError

DEFAULT_CONFIG = "configs/tiny.py"
_config_flags: dict[str, str] = {}  # flag name -> its default path


def define_config_flag(name: str = "config", default: str | None = DEFAULT_CONFIG):
    """`--config PATH` (a Python file with `get_config()`) and its `--config.G.F=V` overrides."""
    _config_flags[name] = default
    # ml_collections loads the default file, and applies the overrides in sys.argv, as soon as
    # the flag is defined: check them first.
    try:
        check_config_arguments(sys.argv[1:])
    except UserError as error:
        _exit(str(error), error.exit_code)
    return config_flags.DEFINE_config_file(name, default, "A config file (a Python file "
                                           "defining get_config()).")


def wants_huge_pages(flag) -> bool:
    """devices.host_huge_pages as the config of a flag made by `define_config_flag` sets it,
    read before the config is checked: startup.use_huge_pages may run the process again, and
    nothing the check says should be said twice. A config that cannot be read says yes (its
    error comes from `config_from_flag`, once)."""
    try:
        return bool(flag.value.devices.host_huge_pages)
    except (OSError, AttributeError, KeyError, TypeError, ValueError):
        return True


def config_from_flag(flag, workdir: str | None = None,
                     log: Callable[[str], None] = print) -> config_lib.Config:
    """The validated Config of a flag made by `define_config_flag`; with checkpoint.init_from,
    its architecture is the base's (`with_base_architecture`). `workdir`: the run's."""
    try:
        value = flag.value
        overridden = set(flags.FLAGS[flag.name].override_values)
    except (OSError, AttributeError, KeyError, TypeError, ValueError) as error:
        raise config_lib.ConfigError(f"--{flag.name}: {error}") from error
    values = value.to_dict()
    unset = [f"{group}.{name}" for group, fields in values.items() if isinstance(fields, dict)
             for name, field_value in fields.items() if field_value is None]
    if unset:
        docs = {f"{g}.{f.name}": f.metadata["doc"] for g, cls in config_lib.GROUPS.items()
                for f in dataclasses.fields(cls)}
        wanted = " and ".join(f"--{flag.name}.{name}=... ({docs.get(name, 'see docs')})"
                              for name in unset)
        raise config_lib.ConfigError(
            f"the config file {flags.FLAGS[flag.name].config_filename} leaves "
            f"{', '.join(unset)} to the command line; set {wanted}.")
    if values.get("checkpoint", {}).get("init_from"):
        values = with_base_architecture(values, overridden, workdir, log)
    return config_lib.from_config_dict(values)


# ---------------------------------------------------------------------------------------------
# The architecture of a run started from a checkpoint. Read from its files without JAX: the
# flags are parsed before the GPUs are chosen and before jax is imported (train.py).

def saved_item(step_dir: epath.Path, item: str) -> dict:
    """A JSON item (config, meta) of a checkpoint, read as a file."""
    try:
        return workdir_lib.read_saved_item(step_dir, item)
    except (OSError, ValueError) as error:
        raise config_lib.ConfigError(f"the {item} of checkpoint {step_dir} cannot be read "
                                     f"({error}); is it a complete checkpoint?") from error


def _missing_base(path: epath.Path, workdir: str | None) -> config_lib.ConfigError:
    own = workdir_lib.latest_checkpoint(epath.Path(workdir).expanduser()) if workdir else None
    base = saved_item(own, "meta").get("base") if own else None
    if base:  # a LoRA run resuming: its checkpoints are adapters on that base
        return config_lib.ConfigError(
            f"no such checkpoint or workdir: {path} (checkpoint.init_from); the LoRA "
            f"checkpoints of {workdir} hold adapters only, on the base {base['step_dir']}: put "
            f"the base back there, or set --config.checkpoint.init_from to where it is now.")
    return config_lib.ConfigError(
        f"no such checkpoint or workdir: {path}. Set --config.checkpoint.init_from to the "
        f"base run's workdir or one of its step directories.")


def with_base_architecture(values: dict, overridden: set[str], workdir: str | None = None,
                           log: Callable[[str], None] = print) -> dict:
    """`values` (a config as nested dicts) with the model group of checkpoint.init_from's
    run, and its tokenizer kind where the run left data.tokenizer at its default.

    A model field the run sets explicitly and differently is a ConfigError naming it:
    explicitly means overridden on the command line (`overridden`: 'model.n_layers', ...) or
    set by the config file to other than the field's default (a file's value that equals
    the default cannot be told from one it did not set; the base's wins then).
    """
    path = epath.Path(values["checkpoint"]["init_from"]).expanduser()
    path = path if path.is_absolute() else path.resolve()
    if not path.exists():
        raise _missing_base(path, workdir)
    step_dir = workdir_lib.latest_checkpoint(path)
    if step_dir is None:
        raise config_lib.ConfigError(
            f"no complete checkpoint under {path}; set --config.checkpoint.init_from to a "
            f"workdir that a run with --workdir has saved into, or one step's directory.")
    saved = config_lib.upgrade(saved_item(step_dir, "config"))
    values = compat.with_base_model(values, dataclasses.asdict(saved.model),
                                    config_lib.ModelConfig.declared_defaults(), overridden)
    values["data"] = dict(values.get("data", {}))
    data, default = values["data"], config_lib.DataConfig.tokenizer
    if ("data.tokenizer" not in overridden and data.get("tokenizer", default) == default
            and data.get("source") != "random"):
        data["tokenizer"] = saved.data.tokenizer
    if data.get("tokenizer") == "bpe" == saved.data.tokenizer and workdir and not (
            epath.Path(workdir).expanduser() / "tokenizer.json").exists():
        # (data/pipeline.py would train a new BPE on this run's data, unknown to the base.)
        raise config_lib.ConfigError(
            f"the base {step_dir} reads its BPE tokenizer; copy {step_dir.parent.parent}/"
            f"tokenizer.json into {workdir} so that this run reads it too.")
    log(f"checkpoint.init_from: the model architecture is that of {step_dir}")
    return values


def check_config_file(path: str) -> None:
    """Raises ConfigError naming `path` if it is missing, does not compile, fails to import or
    has no get_config()."""
    shown = os.path.abspath(path)
    if not os.path.isfile(path):
        near = sorted(p for p in _siblings(path) if p.endswith(".py"))
        hint = f" Config files there: {', '.join(near)}." if near else ""
        raise config_lib.ConfigError(f"config file {shown} does not exist; pass --config with "
                                     f"the path of a config file such as {DEFAULT_CONFIG}.{hint}")
    try:
        spec = importlib.util.spec_from_file_location("_minids_config_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise config_lib.ConfigError(
            f"config file {shown} has a syntax error at line {error.lineno}: {error.msg}; fix "
            f"the file.") from error
    except Exception as error:  # the config file's own code failed: show where, briefly
        where = traceback.extract_tb(error.__traceback__)[-1]
        raise config_lib.ConfigError(
            f"config file {shown} failed to load: {type(error).__name__}: {error} (at "
            f"{where.filename}:{where.lineno}); fix the file, and run from the repository root "
            f"if it imports other configs.") from error
    if not callable(getattr(module, "get_config", None)):
        raise config_lib.ConfigError(f"config file {shown} defines no get_config() function; "
                                     f"add one that returns the config (see {DEFAULT_CONFIG}).")


def _siblings(path: str) -> list[str]:
    directory = os.path.dirname(path) or "."
    return os.listdir(directory) if os.path.isdir(directory) else []


def check_override(flag_name: str, field_path: str) -> None:
    """Raises ConfigError unless `field_path` (e.g. 'model.d_model') names a config field."""
    group, _, field = field_path.partition(".")
    if group not in config_lib.GROUPS:
        raise config_lib.ConfigError(
            f"--{flag_name}.{field_path}: there is no config group {group!r}"
            f"{_did_you_mean(group, config_lib.GROUPS)}; the groups are "
            f"{', '.join(config_lib.GROUPS)}.")
    names = [f.name for f in dataclasses.fields(config_lib.GROUPS[group])]
    if field not in names:
        moved = compat.MOVED.get(field_path)
        hint = (f"; it is now --{flag_name}.{moved}" if moved else
                f"{_did_you_mean(field, names)}; the fields of {group!r} are {', '.join(names)}")
        raise config_lib.ConfigError(f"--{flag_name}.{field_path}: {group} has no field "
                                     f"{field!r}{hint} (docs/configuration.md).")


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_config_arguments(argv: list[str]) -> None:
    """Checks the config files and override names of `argv` (before absl parses it)."""
    for name, path in _config_flags.items():
        for i, arg in enumerate(argv):
            if arg == f"--{name}" and i + 1 < len(argv):
                path = argv[i + 1]
            elif arg.startswith(f"--{name}="):
                path = arg.split("=", 1)[1]
            match = re.match(rf"--(?:no)?{name}\.([^=]+)", arg)
            if match:
                check_override(name, match.group(1))
        if path is not None:  # a config flag without a default may be left out
            check_config_file(path)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its errors as `error:` lines (the config file and overrides
    were checked when their flag was defined)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _exit(f"{error}. See --helpshort for the flags.", 2)
    except UserError as error:
        _exit(str(error), error.exit_code)


def _exit(message: str, code: int):
    print(f"error: {message}", file=sys.stderr, flush=True)
    # Writes that orbax abandoned on a failure are collected at exit: asyncio logs each one
    # with a traceback, and Python warns of each coroutine never awaited. The failure was
    # just reported.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    sys.exit(code)


def _drop_abandoned_callbacks(unraisable) -> None:
    """When one read or write of an orbax restore or save fails, orbax leaves its event loop
    with the other reads and writes still pending: each then prints a traceback when it calls
    back into the closed loop or is collected. The failure itself is reported once, by whoever
    saw it first (a fallback to an older checkpoint goes on training)."""
    error, source = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    code = getattr(source, "cr_code", None)  # a coroutine
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
        return
    _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


def _quiet_orbax(record: logging.LogRecord) -> bool:
    """Keeps orbax's warnings and errors, without its INFO chatter or its tracebacks: every
    exception it logs also reaches the caller, which reports it in one line."""
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
        return True
    if record.levelno < logging.WARNING or record.exc_info:
        return False
    message = record.getMessage().strip().splitlines()
    record.msg, record.args = (message[0][:300] if message else ""), ()
    return True


def _quiet_backends(record: logging.LogRecord) -> bool:
    """Drops JAX's INFO lines about the backends it could not start (TPU, CUDA plugins) that
    open every command on a CPU machine; `--verbosity=1` shows them."""
    return (record.levelno >= logging.WARNING or absl_logging.get_verbosity() >= 1
            or not record.pathname.endswith(f"jax{os.sep}_src{os.sep}xla_bridge.py"))


INTERRUPTED = ("interrupted; stopped without saving the current step (checkpoints already "
               "written are kept).")


def exit_interrupted() -> None:
    """A command's exit on a second Ctrl-C while it saves (training.preemption.StopGuard's
    `on_second_interrupt`): at once, in one line, exit status 130."""
    sys.stdout.flush()
    print(f"error: {INTERRUPTED}", file=sys.stderr, flush=True)
    os._exit(130)  # checkpoints are written whole or not at all; the flock goes with us


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, with a UserError or Ctrl-C ending it in one line."""
    sys.unraisablehook = _drop_abandoned_callbacks
    # orbax logs dozens of INFO lines per save through absl, which the commands show at INFO.
    absl_logging.get_absl_logger().addFilter(_quiet_orbax)
    absl_logging.get_absl_handler().addFilter(_quiet_backends)  # (JAX logs through the root)

    def guarded(argv):
        try:
            return main(argv)
        except UserError as error:
            _exit(str(error), error.exit_code)
        except KeyboardInterrupt:
            _exit(INTERRUPTED, 130)

    app.run(guarded, flags_parser=parse_flags)
