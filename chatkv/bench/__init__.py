"""Benchmarks: codec quality against the exact cache."""
