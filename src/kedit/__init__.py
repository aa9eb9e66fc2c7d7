"""kedit: lifelong knowledge editing for LLMs as a versioned, gated pipeline.

The core library (this package) never imports Prefect; orchestration lives in the
top-level ``tasks/`` and ``flows/`` folders and calls into here.
"""

__version__ = "0.1.0"
