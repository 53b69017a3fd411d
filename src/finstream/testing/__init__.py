"""Testing finstream against real services, for its own tests, its benchmarks and yours.

As httpx ships its MockTransport, finstream ships what it tests itself with:
:mod:`.services` gives an isolated environment on a running stack (a
namespace of topics, consumer groups and Redis keys, and a PostgreSQL
database of its own: :func:`create_env` / :func:`destroy_env`), worker
processes (:class:`WorkerProcess`, :func:`workers`) and conditions to wait
on (:func:`wait_until`); :mod:`.api` signs tokens for the API and serves it
in-process; :mod:`.delivery` holds the in-memory twin of the delivery store
(:class:`~.delivery.MemoryStore`), for the delivery engine's unit tests.
"""

from finstream.testing.services import (
    TestEnv,
    WorkerProcess,
    committed_count,
    create_env,
    destroy_env,
    free_port,
    free_ports,
    group_caught_up,
    metric_value,
    wait_until,
    workers,
)

__all__ = [
    "TestEnv",
    "WorkerProcess",
    "committed_count",
    "create_env",
    "destroy_env",
    "free_port",
    "free_ports",
    "group_caught_up",
    "metric_value",
    "wait_until",
    "workers",
]
