"""Delivery providers, one module each, behind a small shared contract."""
