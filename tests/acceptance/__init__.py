"""Acceptance tests on real Debian trees (debootstrap), skipped where unavailable."""
