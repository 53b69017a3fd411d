"""Every setting of finstream, read from environment variables in one place.

Each field is read from ``FINSTREAM_<FIELD>`` (upper case). The defaults work
with the local stack that ``finstream stack up`` starts, so a fresh checkout
needs no configuration. Nothing outside this module reads ``os.environ``.

``namespace`` prefixes every topic, consumer group and Redis key.
Tests use it to run side by side on one broker without seeing each other's
data; operators can use it to run several environments on one cluster.

The fields are grouped in one model per area (:mod:`.core`, :mod:`.marketdata`,
:mod:`.delivery`, :mod:`.streams`, :mod:`.database`, :mod:`.run`, :mod:`.api`,
:mod:`.privacy`), each with its validators; :class:`Settings` composes them
into the one class every module reads.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from finstream.settings.api import ApiSettings
from finstream.settings.common import REPO_ROOT
from finstream.settings.core import CoreSettings
from finstream.settings.database import DatabaseSettings
from finstream.settings.delivery import DeliverySettings
from finstream.settings.marketdata import MarketDataSettings
from finstream.settings.privacy import PrivacySettings
from finstream.settings.run import RunSettings
from finstream.settings.streams import StreamRoleSettings

__all__ = ["REPO_ROOT", "Settings", "child_environment", "describe_invalid", "get_settings"]


# Pydantic orders fields from the last base to the first: the groups are listed
# in reverse so that model_fields (and validation errors) keep the order of the
# areas above, core first.
class Settings(
    PrivacySettings,
    ApiSettings,
    RunSettings,
    DatabaseSettings,
    StreamRoleSettings,
    DeliverySettings,
    MarketDataSettings,
    CoreSettings,
    BaseSettings,
):
    model_config = SettingsConfigDict(env_prefix="FINSTREAM_", extra="ignore")

    # -- derived names -----------------------------------------------------------
    def topic(self, name: str) -> str:
        """The Kafka topic name for a catalogue name, with the namespace applied."""
        return f"{self.namespace}{name}"

    def group(self, role: str) -> str:
        return f"{self.namespace}finstream-{role}"

    def redis_key(self, key: str) -> str:
        return f"{self.namespace}{key}"

    @property
    def production(self) -> bool:
        return self.env == "production"

    def synthetic_market_refusal(self, providers: set[str]) -> str | None:
        """Why synthetic prices (simulated, replay) may not be published here, if so.

        Their ticks land on the production md.ticks and fire real users' alerts.
        """
        synthetic = sorted(providers & {"simulated", "replay"})
        if not synthetic or not self.production or self.md_allow_synthetic:
            return None
        return (
            f"{', '.join(synthetic)} market data is not real, and FINSTREAM_ENV=production: "
            "its prices would reach production topics and fire real users' alerts. Configure "
            "real providers (FINSTREAM_MD_CHAIN), or set FINSTREAM_MD_ALLOW_SYNTHETIC=true "
            "for a load test"
        )

    @property
    def mailpit_path(self) -> Path:
        return self.mailpit_bin or REPO_ROOT / ".tools" / "bin" / "mailpit"

    @property
    def sandbox_url(self) -> str:
        return f"http://{self.sandbox_host}:{self.sandbox_port}"

    @property
    def mailpit_url(self) -> str:
        return f"http://{self.sandbox_host}:{self.mailpit_http_port}"

    @property
    def symbols(self) -> list[str]:
        return [s.strip().upper() for s in self.sim_symbols.split(",") if s.strip()]


def describe_invalid(exc: ValidationError) -> str:
    """A settings validation error as one line naming the variables (for the CLI)."""
    parts = []
    for error in exc.errors():
        msg = str(error["msg"]).removeprefix("Value error, ")
        loc = error.get("loc") or ()
        parts.append(f"FINSTREAM_{str(loc[0]).upper()}: {msg}" if loc else msg)
    return "invalid settings: " + "; ".join(parts)


@functools.cache
def get_settings() -> Settings:
    return Settings()


def child_environment(**overrides: str) -> dict[str, str]:
    """Environment for a child process: ours plus FINSTREAM_* overrides.

    Lives here so that the one module that touches os.environ stays the only one.
    """
    env = dict(os.environ)
    env.update({f"FINSTREAM_{k.upper()}": v for k, v in overrides.items()})
    return env
