"""Writers to PostgreSQL, Redis and delivery providers."""
