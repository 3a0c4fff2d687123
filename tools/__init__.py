"""Tools for developing on one machine: real multi-process clusters for tests, benchmarks and demos.

They live in the repository, not in the installed `exo` package: tests and bench/ import
them with the repository root on `sys.path` (pytest puts it there; bench scripts add it).
"""
