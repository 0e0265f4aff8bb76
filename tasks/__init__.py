"""Prefect tasks: thin wrappers that add retries, caching and artifacts around `chimein` calls."""
