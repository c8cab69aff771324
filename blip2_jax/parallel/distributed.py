"""Multi-host initialisation: `jax.distributed.initialize` from explicit flags, or automatically
where the cluster describes itself (TPU pods, SLURM); a no-op for a single process."""
from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               cpu_collectives: str = "gloo") -> None:
    """Join the job. Explicit flags win; else TPU pods and SLURM jobs initialise themselves."""
    if jax.distributed.is_initialized():
        return
    if coordinator_address:
        # Only the CPU client reads this (cross-process collectives on CPU); asking for the backend
        # here would initialise it before `jax.distributed.initialize`, which must come first.
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    elif "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()
