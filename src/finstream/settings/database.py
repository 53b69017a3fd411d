"""Database operations (issue 13): pools, partitions and retention, health, backups."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from finstream.settings.common import absolute


class DatabaseSettings(BaseModel):
    """A group of the fields of :class:`finstream.settings.Settings`."""

    # -- database operations (issue 13) ------------------------------------------
    # Connection pools: every worker's asyncpg pool (the delivery workers and
    # the API size theirs below). Usage and acquire waits are Prometheus
    # metrics (finstream_db_pool_*).
    db_pool_min_size: int = Field(default=1, ge=0)
    db_pool_max_size: int = Field(default=5, gt=0)
    db_pool_acquire_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a worker waits for a pooled connection."
    )
    delivery_db_pool_max_size: int | None = Field(
        default=None, gt=0, description="Default: delivery_concurrency + 4."
    )
    api_db_pool_max_size: int = Field(default=10, gt=0)
    # Partitions and retention (`finstream db retention`, the `retention` role).
    # Policies are a number and d, w, mo or y. Delivery rows are never purged
    # while their message may still be redriven from dlq or re-read from an
    # outbound topic (topics.yaml retention), nor before they are final.
    db_retention_ticks: str = "2y"
    db_retention_bars: str = "10y"
    db_retention_deliveries: str = Field(
        default="13mo", description="delivery_results partitions and final deliveries rows."
    )
    db_retention_audit: str = "7y"
    db_retention_action: Literal["drop", "detach"] = Field(
        default="drop", description="detach keeps an expired partition as a table to archive."
    )
    db_partitions_ahead: int = Field(
        default=7, ge=1, description="Periods created ahead (days of ticks, months of the others)."
    )
    retention_interval: float = Field(
        default=3600.0,
        ge=0,
        description="Seconds between retention passes of the `retention` role (0: only monitor).",
    )
    audit_verify_interval: float = Field(
        default=3600.0,
        ge=0,
        description="Seconds between walks of the audit chain by the `retention` role "
        "(finstream_audit_chain_ok; 0: never).",
    )
    db_monitor_interval: float = Field(
        default=30.0, gt=0, description="Seconds between database health metrics updates."
    )
    # Health thresholds (`finstream db health`).
    db_long_query_seconds: float = Field(default=300.0, gt=0)
    db_idle_in_transaction_seconds: float = Field(default=60.0, gt=0)
    # Backups with pgBackRest (`finstream db backup|backups|verify|restore`).
    # Locally `finstream stack up` writes <stack_dir>/pgbackrest/pgbackrest.conf
    # with a repository under the stack dir and archives WAL into it; in
    # production pgBackRest reads its own configuration (PGBACKREST_* variables
    # or pgbackrest_config) for a repository on a volume or S3-compatible storage.
    backup_stanza: str = Field(default="finstream", pattern=r"^[A-Za-z0-9._-]+$")
    pgbackrest_config: Path | None = Field(
        default=None, description="Default: <stack_dir>/pgbackrest/pgbackrest.conf when it exists."
    )
    backup_archive: bool = Field(
        default=True, description="Continuous WAL archiving on the stack's own PostgreSQL."
    )
    backup_full_every_hours: float = Field(default=24.0, gt=0, description="Full backup schedule.")
    backup_diff_every_hours: float | None = Field(
        default=None, gt=0, description="Differential backup schedule (off by default)."
    )
    backup_incr_every_hours: float | None = Field(
        default=1.0, gt=0, description="Incremental backup schedule."
    )
    backup_retention_days: int = Field(
        default=30, gt=0, description="Days of full backups (and their WAL) kept: the PITR window."
    )

    @field_validator(
        "pgbackrest_config",
        mode="after",
    )
    @classmethod
    def _absolute_database_paths(cls, value: Path | None) -> Path | None:
        return absolute(value)

    @field_validator(
        "db_retention_ticks", "db_retention_bars", "db_retention_deliveries", "db_retention_audit"
    )
    @classmethod
    def _retention_policy(cls, value: str) -> str:
        from finstream.domain.retention import Policy

        Policy.parse(value)
        return value
