"""The remote code shipped in an exported directory (copied as files, never imported by kedit at run time).

These two modules must import only ``torch`` and ``transformers``: they run in a process that has no kedit.
"""
