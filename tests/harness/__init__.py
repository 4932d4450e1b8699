"""Helpers shared by the black-box test suites (tests/server, tests/cluster)."""
