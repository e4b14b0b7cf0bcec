"""Integration tests: real daemons on loopback ports, real TLS, real databases."""
