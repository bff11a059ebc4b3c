"""Integrations with evaluation frameworks (each imports its framework only when used)."""
