"""Database operations: partitions and retention, roles, health, backup and restore."""
