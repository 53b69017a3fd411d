"""Real services for tests: now :mod:`finstream.testing.services`, re-exported here."""

from finstream.testing.services import (
    REPO,
    TestEnv,
    WorkerProcess,
    _db_url,
    child_pids,
    committed_count,
    create_env,
    destroy_env,
    free_port,
    free_ports,
    group_caught_up,
    kafka_security_env,
    metric_value,
    pid_alive,
    wait_until,
    workers,
)

__all__ = [
    "REPO",
    "TestEnv",
    "WorkerProcess",
    "_db_url",
    "child_pids",
    "committed_count",
    "create_env",
    "destroy_env",
    "free_port",
    "free_ports",
    "group_caught_up",
    "kafka_security_env",
    "metric_value",
    "pid_alive",
    "wait_until",
    "workers",
]
