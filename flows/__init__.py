"""Prefect flows: the whole pipeline, the expert zoo for the embedded default, scheduled re-evaluation."""
