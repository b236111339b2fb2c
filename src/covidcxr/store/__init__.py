"""The store: metadata database (SQLite or PostgreSQL) and content-addressed blobs.

This is the only package that holds SQL.
"""
