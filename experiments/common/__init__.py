"""Helpers shared by the benchmark scripts: models by name, a plain training loop, result files and plots."""
