"""Alembic's entry point for these migrations; rlhf.runtime.migrations runs them on its own connection."""

from alembic import context

from rlhf.runtime.migrations import run_env

run_env(context)
