"""Market-data sources: one module per provider, plus simulated and replay feeds."""
