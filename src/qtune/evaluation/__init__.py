"""Metrics (pure functions), evaluation runners and reports."""
