"""Pure domain logic: no I/O, no imports from agents, sinks, connectors or api."""
