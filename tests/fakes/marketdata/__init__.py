"""Local fake market-data providers speaking each provider's documented wire format.

Every fake serves quotes from one shared :class:`~.market.FakeMarket`, so the
same quote is visible from every provider at the same time (what failover
deduplication is about), and has a ``mode`` that switches it into one of the
provider's documented (or user-reported) ways of failing: throttling, auth
errors, HTML pages, truncated JSON, zero-filled quotes, silent sockets.
"""
