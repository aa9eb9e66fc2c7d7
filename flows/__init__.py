"""Prefect flows: compose ``tasks/`` into the nightly refresh and the operator flows."""
