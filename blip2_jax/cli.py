"""The `blip2-jax` command: `blip2-jax train --config configs/<file>.py:<preset> --workdir DIR`.

The same command runs on every host of a pod or cluster; multi-host jobs join through
`--coordinator_address/--num_processes/--process_id` or their scheduler's environment.
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config: configs/<file>.py:<preset>.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (multi-host).")

COMMANDS = ("train",)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: blip2-jax {{{','.join(COMMANDS)}}} --config ... --workdir ...")
    from blip2_jax.train import loop  # pylint: disable=import-outside-toplevel  # keep --help fast

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; steps print to stdout
    config = _CONFIG.value
    if config is None or not _WORKDIR.value:
        raise app.UsageError("train needs --config and --workdir")
    if _COORDINATOR.value:
        config.distributed.update(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                  process_id=_PROCESS_ID.value)
    loop.train(config, _WORKDIR.value)


def run() -> None:
    app.run(main)
