"""Prefect tasks: thin wrappers around kedit's core steps (``kedit.refresh``, ``kedit.lineage.ops``)."""
