"""Prefect flows and tasks: the pipeline's stages, each a thin call into the libraries."""
