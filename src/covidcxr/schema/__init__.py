"""The collection schema: records, columns, values and the finding vocabulary (pure: no I/O)."""
