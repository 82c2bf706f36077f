"""Test and demo helpers (namespace lab, traffic tools); importable by tests, demo and bench."""
