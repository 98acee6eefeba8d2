"""Alembic migrations of the run store (run by ``radfed.store.engine.open_store``)."""
