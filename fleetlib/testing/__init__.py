"""Helpers that tests, benchmarks and the quickstart share: real daemons on loopback
ports, synthetic and Debian trees, CLI runs (like click's own click.testing)."""
