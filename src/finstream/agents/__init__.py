"""Stream roles: one module per role, thin wiring of topics to domain/ and sinks/ on the stream engine."""
