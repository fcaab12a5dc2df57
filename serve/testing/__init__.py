"""Tiny deterministic models and repository builders for tests and the built-in demo."""
