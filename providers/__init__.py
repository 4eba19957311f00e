"""Execution providers: the table, availability checks and session creation."""
