"""What the API and the roles read back: the PostgreSQL pool and migrations, the Redis
read models (quotes, alert rules, preferences, in-app inboxes), journeys, and the
templates every process renders with."""
