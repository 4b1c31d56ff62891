"""Pipelines: one module each, one public entry point each, each with a CLI subcommand."""
