"""Quix Streams applications doing finstream's workloads: the anchors of the benchmarks."""
