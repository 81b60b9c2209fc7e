"""Typer command line of the MNIST pipeline; thin wrappers over :mod:`pipeline`."""
