"""A `blip2-jax` subcommand: its words, synopsis, flags and what it runs.

Each command defines its flags into an absl `FlagValues` of its own, made when it is called: its
`--help` lists only them, a flag another command takes is an unknown flag here, and a name keeps one
meaning across commands (`--out` is what a command writes, `--src` what `convert` reads,
`--checkpoint` the weights a command runs, in any form `weights.load` reads).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from blip2_jax.errors import InputNotFound

CHECKPOINT_FORMS = "a Hugging Face directory or hub id, a model checkpoint, or a training workdir"


@dataclasses.dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    synopsis: str  # after `blip2-jax <words>`
    summary: str  # one line for `blip2-jax --help`
    define: Callable[[flags.FlagValues, list[str]], None]  # (flags, argv): argv holds --config.x=y overrides
    run: Callable[[flags.FlagValues], None]

    @property
    def name(self) -> str:
        return " ".join(self.words)

    def usage(self) -> str:
        return f"usage: blip2-jax {self.name} {self.synopsis}"

    def flag_values(self, argv: list[str]) -> flags.FlagValues:
        """A fresh set of this command's flags, not yet parsed."""
        values = flags.FlagValues()
        self.define(values, argv)
        return values

    def require(self, values: flags.FlagValues, *names: str) -> None:
        """A usage error naming the flags among `names` that were not given."""
        absent = [f"--{n}" for n in names if not values[n].value]
        if absent:
            raise app.UsageError(f"{self.name} needs {', '.join(absent)}\n{self.usage()}")


def define_config(values: flags.FlagValues, argv: list[str], what: str) -> None:
    config_flags.DEFINE_config_file("config", None, f"{what}: configs/<file>.py:<preset>; fields are set with "
                                    "--config.<field>=<value>.", flag_values=values, sys_argv=argv)


def define_checkpoint(values: flags.FlagValues, what: str) -> None:
    flags.DEFINE_string("checkpoint", None, f"{what}: {CHECKPOINT_FORMS} (its latest step, or --step).",
                        flag_values=values)
    flags.DEFINE_integer("step", None, "The step of a training workdir to read (default: the latest).",
                         flag_values=values)


def define_src(values: flags.FlagValues, what: str) -> None:
    flags.DEFINE_string("src", None, f"What is converted: {what}.", flag_values=values)


def define_out(values: flags.FlagValues, what: str) -> None:
    flags.DEFINE_string("out", None, f"What is written: {what}.", flag_values=values)


def define_workdir(values: flags.FlagValues, what: str) -> None:
    flags.DEFINE_string("workdir", None, what, flag_values=values)


def define_tokenizer(values: flags.FlagValues, what: str) -> None:
    flags.DEFINE_string("tokenizer", None, f"The language model's tokenizer, a directory or hub id: {what}.",
                        flag_values=values)


def loaded_config(values: flags.FlagValues):
    """The parsed --config (None if not given); a file that does not exist is a user error
    (ml_collections defers it to the first field read, as an IOError from deep inside the config)."""
    config = values["config"].value
    if config is None:
        return None
    try:
        config.get("")  # an unloadable config file raises on its first read
    except IOError as e:
        raise InputNotFound(f"--config {config_flags.get_config_filename(values['config'])}: no such config file "
                            "(configs/<file>.py:<preset>)") from e
    return config


def define_distributed(values: flags.FlagValues) -> None:
    """The multi-host flags `launch/*.sh` pass (TPU pods and SLURM jobs need none)."""
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host).", flag_values=values)
    flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host).", flag_values=values)
    flags.DEFINE_integer("process_id", -1, "This process's index (multi-host).", flag_values=values)
