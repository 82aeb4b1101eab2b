"""Benchmarks (`make bench`): speed and memory as ratios measured side by side in one run."""
