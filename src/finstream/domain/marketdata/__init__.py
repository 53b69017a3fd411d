"""Market data: ticks and their validation, OHLCV bars, provider responses normalized
into ticks, de-duplication across providers, failover between them, and the
simulated market."""
