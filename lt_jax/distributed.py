"""Several processes, one job (docs/pods.md): JAX's own distributed runtime (`jax.distributed`), on TPU pod slices,
multi-GPU hosts, or localhost processes with CPU collectives.

The rule for work split across processes: each process is a data-parallel group. It runs every example or prompt
whose position p in the input has p % process_count == process_index, on the devices it addresses
(`lt_jax.sharding.local_mesh`), writes its rows to its own part file (`lt_jax.records`), and waits for the others
at a barrier before process 0 merges. No collective runs per example, so processes never wait on each other's
prompt lengths; the `model` axis of a mesh stays within a host."""
from __future__ import annotations

import itertools

import jax

from lt_jax.errors import LtJaxError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None):
    """Join a job: `coordinator` "HOST:PORT" of process 0 with `num_processes` and this `process_id`, or "auto"
    (JAX detects the cluster: TPU pods, SLURM, Open MPI). Nothing given: one process, nothing to do. Must run
    before anything touches a device."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if not any(given):
        return
    if coordinator == "auto":
        if num_processes is not None or process_id is not None:
            raise LtJaxError("--coordinator auto detects the processes itself; drop --num-processes and "
                             "--process-id (or give --coordinator HOST:PORT).")
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:  # no cluster JAX knows (TPU pod, SLURM, Open MPI), or too late
            raise LtJaxError(f"--coordinator auto: JAX detects no cluster here ({e}); give --coordinator HOST:PORT "
                             f"--num-processes N --process-id I.") from None
        return
    if not all(given):
        raise LtJaxError("--coordinator HOST:PORT, --num-processes N and --process-id I go together (or "
                         "--coordinator auto alone, where JAX detects the cluster).")
    if not 0 <= process_id < num_processes:
        raise LtJaxError(f"--process-id {process_id} must lie in 0..{num_processes - 1} (--num-processes "
                         f"{num_processes}).")
    # CPU devices of different processes reach each other through gloo; accelerators use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def share() -> tuple[int, int]:
    """(this process's index, the number of processes)."""
    return jax.process_index(), jax.process_count()


def mine(items: list, index: int, count: int) -> list:
    """The items at positions p with p % count == index: this process's share."""
    return items[index::count]


_BARRIERS = itertools.count()  # every process passes the same barriers in the same order: the same ids
BARRIER_TIMEOUT_S = 24 * 3600


def barrier(name: str):
    """Wait until every process reaches the barrier of this name (a no-op for one process), however long the
    others still work. It waits on the coordination service that `jax.distributed.initialize` started (as orbax
    does), not on a collective over devices (`multihost_utils.sync_global_devices`): that compiles and runs a
    program, and on CPU first connects gloo peers with a 30 s timeout, which a loaded host once exceeded. A
    process that dies fails the barrier (the service's heartbeats)."""
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed
        jax_distributed.global_state.client.wait_at_barrier(f"lt-jax {next(_BARRIERS)}: {name}",
                                                            BARRIER_TIMEOUT_S * 1000)
