"""`blip2-jax demo`, `train` and `plan`: the commands that build and train a model from a config."""
from __future__ import annotations

import math
import os

from absl import app, flags, logging

from blip2_jax.cli.command import Command, define_config, define_distributed, define_workdir, loaded_config


def simulated_cpu_devices(count: int) -> None:
    """Run on `count` simulated CPU devices: read when JAX starts its backend, so set before that."""
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    if "JAX_PLATFORMS" not in os.environ:
        import jax  # pylint: disable=import-outside-toplevel

        jax.config.update("jax_platforms", "cpu")


def _demo_flags(values: flags.FlagValues, argv: list[str]) -> None:
    del argv
    define_workdir(values, "Where the demo's runs, checkpoints and results go (default: /tmp/blip2_jax_demo).")
    flags.DEFINE_boolean("instruct", False, "Then the instruction demo: InstructBLIP tuned from the demo's BLIP-2 on "
                         "questions phrased through several templates, its accuracy per phrasing.", flag_values=values)


def _demo(values: flags.FlagValues) -> None:
    # 2 simulated devices, not 8: still data-parallel with ITC's cross-device gather, and on a 2-core
    # CPU 8 devices only wait on each other (measured, stage 1 alone: 0.235 s a step on 8, 0.185 on 1
    # or 2; the whole demo 13.0 min against 14.7 on the same AVX2 EPYC, ITC 0.955, VQA 0.808)
    simulated_cpu_devices(2)
    # pylint: disable=import-outside-toplevel
    from blip2_jax.demo import configs
    from blip2_jax.demo import run as demo_run

    logging.set_verbosity(logging.WARNING)
    workdir = values.workdir or configs.DEFAULT_WORKDIR
    results = demo_run.run(workdir)
    print(demo_run.table(results))
    if values.instruct:
        print(f"\n{demo_run.instruct_table(demo_run.run_instruct(workdir))}")


def _train_flags(values: flags.FlagValues, argv: list[str]) -> None:
    define_config(values, argv, "Training config")
    define_workdir(values, "Directory for checkpoints, metrics and TensorBoard logs; a run there is resumed.")
    define_distributed(values)


def _train(values: flags.FlagValues) -> None:
    # pylint: disable=import-outside-toplevel  # keep --help fast
    from blip2_jax.train import loop
    from blip2_jax.train.validate import check_train_config
    from blip2_jax.weights.model_checkpoint import absolute

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; steps print to stdout
    config = loaded_config(values)
    if config is None or not values.workdir:
        raise app.UsageError(f"train needs --config and --workdir\n{TRAIN.usage()}")
    check_train_config(config)  # the device checks follow once JAX is up (loop.train)
    if values.coordinator_address:
        config.distributed.update(coordinator_address=values.coordinator_address,
                                  num_processes=values.num_processes, process_id=values.process_id)
    for field in ("hf", "checkpoint", "stage1"):  # Orbax reads these (hub ids and URLs stay as given)
        if os.path.exists(config.init[field]):
            config.init[field] = absolute(config.init[field])
    loop.train(config, absolute(values.workdir))


def _plan_flags(values: flags.FlagValues, argv: list[str]) -> None:
    define_config(values, argv, "Training config to plan (its global batch: --config.batch_size)")
    flags.DEFINE_string("mesh", "data=8", "data=D,fsdp=F,tensor=T (simulated CPU devices; over 64, the data axis "
                        "is folded into one replica).", flag_values=values)
    flags.DEFINE_enum("device_kind", None, ["v4", "v5e", "v5p", "h100", "a100"],
                      "The device to check the fit on (default: all).", flag_values=values)


def _plan(values: flags.FlagValues) -> None:
    # pylint: disable=import-outside-toplevel
    from blip2_jax.train import plan as plan_lib
    from blip2_jax.train.validate import check_train_config

    config = loaded_config(values)
    if config is None:
        raise app.UsageError(f"plan needs --config\n{PLAN.usage()}")
    check_train_config(config)  # --mesh replaces config.mesh: make_plan checks the batch against it
    mesh = plan_lib.parse_mesh(values.mesh)
    need = math.prod(mesh.values())  # one simulated device per mesh position, up to a limit
    simulated_cpu_devices(need if need <= plan_lib.MAX_SIMULATED_DEVICES else need // mesh["data"])
    run = "instruct" if config.model.instruction_aware else config.stage  # the paper's figures are BLIP-2's
    print(plan_lib.make_plan(config, mesh).report(run, values.device_kind))


DEMO = Command(("demo",), "[--workdir DIR] [--instruct]",
               "Trains and evaluates BLIP-2 end to end on the packaged easy-VQA set, on 2 simulated CPU devices.",
               _demo_flags, _demo)
TRAIN = Command(("train",), "--config configs/<file>.py:<preset> --workdir DIR [--config.<field>=<value> ...]",
                "Trains (or resumes) a run; the same command on every host of a pod or cluster.",
                _train_flags, _train)
PLAN = Command(("plan",), "--config configs/<file>.py:<preset> --mesh data=D,fsdp=F,tensor=T [--device_kind v4]",
               "Compiles a config's step on a simulated mesh and reports its memory per device and fit.",
               _plan_flags, _plan)
