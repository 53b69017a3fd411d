"""The templates every process renders with: packaged ones plus FINSTREAM_TEMPLATES_DIR."""

from __future__ import annotations

from finstream.domain.notify.templates import Limits, Templates
from finstream.resources import resource
from finstream.settings import Settings


def load_templates(settings: Settings) -> Templates:
    """Packaged templates overridden and extended by ``templates_dir``, reloaded on change."""
    return Templates(
        resource("templates"),
        overlay=settings.templates_dir,
        default_locale=settings.router_default_locale,
        limits=Limits(sms_segments=settings.router_sms_segments),
        reload_seconds=settings.templates_reload_seconds,
    )
