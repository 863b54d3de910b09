"""Conformance suites: the peers' own conventions applied to this package."""
