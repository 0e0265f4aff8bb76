"""Prefect flows, one workflow per file."""
