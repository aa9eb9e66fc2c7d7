"""Editors: ROME / r-ROME, MEMIT and AlphaEdit behind one interface (see :mod:`kedit.editors.base`)."""
