"""faust agents: thin glue from topics to domain/ and sinks/."""
