"""Model store (import, load, hash) and per-architecture adapters."""

from kedit.models.adapters import ArchSpec, ModelAdapter, UnknownArchitectureError
from kedit.models.store import LoadedModel, ModelManifest, load_model

__all__ = ["ArchSpec", "ModelAdapter", "UnknownArchitectureError", "LoadedModel", "ModelManifest", "load_model"]
