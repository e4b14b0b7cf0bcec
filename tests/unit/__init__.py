"""Unit tests: one module at a time, on real files, no daemons."""
