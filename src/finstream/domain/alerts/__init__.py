"""Price alerts: the rules users write (:mod:`.rules`) and their evaluation on ticks
(:mod:`.engine`), the one function the live alerts role and back-tests share."""

# The rules' public names at the package's address, which bench/ (owned by the
# lead) imports from; the rest of the code base imports from .rules.
from finstream.domain.alerts.rules import AlertRule, parse_rule

__all__ = ["AlertRule", "parse_rule"]
