"""Tools for developing on one machine: real multi-process clusters for tests, benchmarks and demos."""
