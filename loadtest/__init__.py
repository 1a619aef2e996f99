"""Load generator and benchmarks for a running loramux server (`python -m loadtest --help`)."""
