"""subd: the agent on every host: scanner, object cache, updater, triggers."""
