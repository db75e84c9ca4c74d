"""Benchmarks that print one JSON object per line; results recorded in BENCHMARKS.md."""
