"""Alembic environment of the SQL store; a package so that a normal install ships it."""
