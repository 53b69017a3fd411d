"""Process runtime shared by every worker role: logging, metrics, health, Kafka I/O."""
