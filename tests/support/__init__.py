"""Helpers shared by the tests (fixtures proper live in tests/conftest.py)."""
