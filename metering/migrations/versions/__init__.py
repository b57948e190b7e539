"""Alembic revisions of the SQL store (Alembic skips this file when scanning)."""
