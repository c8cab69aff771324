"""The `blip2-jax` command: one subcommand per job, each with only its own flags and `--help`.

    blip2-jax demo [--workdir DIR]
    blip2-jax train --config configs/<file>.py:<preset> --workdir DIR [--config.<field>=<value> ...]
    blip2-jax plan --config configs/<file>.py:<preset> --mesh data=D,fsdp=F,tensor=T
    blip2-jax generate --checkpoint DIR_OR_HUB_ID --image a.jpg [--prompt "a photo of" | --question "what?"]
    blip2-jax eval --config configs/eval/<task>.py:<preset> --checkpoint DIR_OR_HUB_ID --out DIR
    blip2-jax convert from-hf|to-hf|from-lavis|to-lavis --src ... --out ...
    blip2-jax data build --annotations a.json --image_root DIR --out PREFIX --num_shards N

`blip2-jax COMMAND --help` lists a command's flags (`cli/train.py`, `cli/inference.py`,
`cli/convert.py`). A user error (a bad flag, config value, path or input; `errors.UserError`)
prints one or two lines, `blip2-jax: error: ...`, and exits with code 2; any other exception is a
bug and keeps its traceback. Configs are checked before anything compiles (`train/validate.py`).
SIGTERM before the training loop starts exits 0 at once (nothing is trained yet, so nothing to save).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

from absl import app, flags

from blip2_jax.cli import convert, inference, infer
from blip2_jax.cli import train as train_commands
from blip2_jax.cli.command import Command, loaded_config
from blip2_jax.errors import UserError

COMMANDS: dict[tuple[str, ...], Command] = {c.words: c for c in (
    train_commands.DEMO, train_commands.TRAIN, train_commands.PLAN, inference.GENERATE, inference.EVAL,
    *infer.COMMANDS.values(), convert.FROM_HF, convert.TO_HF, convert.FROM_LAVIS, convert.TO_LAVIS,
    convert.DATA_BUILD)}
HELP = ("-h", "--help")


def usage() -> str:
    lines = [f"  blip2-jax {c.name} {c.synopsis}" for c in COMMANDS.values()]
    return "usage:\n" + "\n".join(lines) + "\n`blip2-jax COMMAND --help` lists a command's flags."


def overview() -> str:
    """`blip2-jax --help`: every command with what it does."""
    return "\n".join(["usage: blip2-jax COMMAND [flags]", ""] +
                     [f"  {c.name:<20} {c.summary}" for c in COMMANDS.values()] +
                     ["", "`blip2-jax COMMAND --help` lists a command's flags."])


def command_help(command: Command) -> str:
    """`blip2-jax COMMAND --help`: its usage, what it does, and its flags (only its own)."""
    values = command.flag_values([])
    lines = [command.usage(), "", command.summary, "", "flags:"]
    for name in values:
        flag = values[name]
        default = "" if flag.default in (None, "", []) else f" (default: {flag.default})"
        lines.append(f"  --{name}: {flag.help}{default}")
    return "\n".join(lines)


def find_command(args: list[str]) -> Command:
    """The command `args` (the words after `blip2-jax`) start with."""
    words = tuple(a for a in args[:2] if not a.startswith("-"))
    for size in (2, 1):
        if words[:size] in COMMANDS:
            return COMMANDS[words[:size]]
    given = " ".join(words)
    raise app.UsageError(f"{f'unknown command {given!r}' if given else 'no command given'}\n{usage()}")


def _innermost_user_error(error: BaseException) -> UserError | None:
    """The UserError that started `error`'s chain: ml_collections re-raises an error from a config
    file's get_config with the traceback as its message, and absl wraps that once more."""
    found = None
    while error is not None:
        if isinstance(error, UserError):
            found = error
        error = error.__cause__ or error.__context__
    return found


def _key_message(error: BaseException) -> str:
    """The text of a KeyError, which ml_collections may wrap in an AttributeError."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return str(error.args[0]) if error.args else ""


def _unknown_config_field(error: BaseException, argv: list[str]) -> str | None:
    """The `--config.x.y=v` whose field does not exist, when that is what `error` is (ml_collections
    raises a raw AttributeError or KeyError from resolving the override's path)."""
    if not isinstance(error, (AttributeError, KeyError)):
        return None
    if not any(frame.filename.endswith("config_path.py") for frame in traceback.extract_tb(error.__traceback__)):
        return None
    name = _key_message(error).splitlines()[0].strip("\"'")  # then "Did you mean ...?"
    overrides = [a.lstrip("-") for a in argv if a.lstrip("-").startswith("config.")]
    return next((a for a in overrides if name in a.split("=", 1)[0].split(".")), f"config.{name}")


def parse(argv: list[str]) -> tuple[Command, flags.FlagValues]:
    """`argv` (`blip2-jax COMMAND ...`) -> the command and its parsed flags, with a `--config` loaded
    and its overrides applied. A bad flag, value, config file or override is a UserError; a config
    file that fails to load for any other reason is a bug and keeps its traceback."""
    command = find_command(argv[1:])
    values = command.flag_values(argv)
    try:
        stray = values([argv[0], *argv[1 + len(command.words):]])[1:]
        if "config" in values:
            loaded_config(values)
    except UserError:
        raise
    except Exception as e:  # pylint: disable=broad-except  # classified below; the rest re-raised
        user = _innermost_user_error(e)
        if user is not None:
            raise UserError(str(user)) from e
        field = _unknown_config_field(e, argv)
        if field is not None:
            hint = _key_message(e).splitlines()[1:2]  # ml_collections' "Did you mean ...?"
            raise UserError("\n".join([f"--{field}: the config has no field "
                                        f"{field.split('=', 1)[0].removeprefix('config.')!r}", *hint])) from e
        if isinstance(e, flags.Error) and "Error whilst parsing config file" not in str(e):
            raise UserError(f"{command.name}: {e}") from e
        raise
    if stray:
        raise app.UsageError(f"{command.name}: stray argument {stray[0]!r}\n{command.usage()}")
    return command, values


def main(argv: list[str]) -> None:
    """Runs `argv` (`blip2-jax COMMAND ...`), or prints the help it asks for."""
    if len(argv) > 1 and argv[1] in HELP:
        print(overview())
        return
    if any(a in HELP for a in argv[1:]):
        print(command_help(find_command(argv[1:])))
        return
    command, values = parse(argv)
    command.run(values)


def _fail(message: str) -> None:
    """A user error: its message on stderr, exit code 2 (as argparse does)."""
    sys.stdout.flush()
    sys.stderr.write(f"blip2-jax: error: {message}\n")
    raise SystemExit(2)


def _run_main(argv: list[str]) -> None:
    try:
        main(argv)
    except (UserError, app.UsageError) as e:
        _fail(str(e))


def _absl_defaults(argv: list[str]) -> list[str]:
    """absl's own flags (its logging's) keep their defaults; each command parses its own flags."""
    flags.FLAGS(argv[:1])
    return argv


def exit_on_sigterm_until_replaced() -> None:
    """SIGTERM exits 0 at once until something else (the training loop's preemption handler) takes
    the signal over. A Python handler alone would wait for the main thread to leave a compile; the
    signal's wakeup fd wakes a thread instead, which exits while the handler is still this one."""

    def startup(signum, frame):  # noqa: ARG001  # the thread below does the work
        del signum, frame

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def watch():
        while True:
            received = os.read(read_fd, 64)
            if signal.SIGTERM in received and signal.getsignal(signal.SIGTERM) is startup:
                sys.stdout.flush()
                os._exit(0)  # pylint: disable=protected-access  # nothing trained yet: nothing to save

    threading.Thread(target=watch, daemon=True, name="sigterm-at-startup").start()
    signal.signal(signal.SIGTERM, startup)
    signal.set_wakeup_fd(write_fd)


def run() -> None:
    from blip2_jax.data.pipeline import limit_malloc_arenas  # pylint: disable=import-outside-toplevel

    # Before any thread allocates: keeps a long input pipeline's memory flat. Not for the demo: its
    # 64 px images need no cap, and 2 arenas slowed its 8-device CPU steps by half (0.21 s vs 0.14 s).
    if sys.argv[1:2] != ["demo"]:
        limit_malloc_arenas()
    if sys.argv[1:2] == ["train"]:
        exit_on_sigterm_until_replaced()
    app.run(_run_main, flags_parser=_absl_defaults)
