"""The use cases behind the commands, as typed functions: a request dataclass in, an outcome
out, progress through a :data:`pipelines.log.Log`. ``jobs/`` parses arguments into the
requests and prints the outcomes; nothing here parses a command line or prints a result."""
