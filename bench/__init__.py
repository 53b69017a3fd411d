"""Benchmarks: `make bench` (python -m bench [name ...]).

Each ``bench/bench_<name>.py`` has a ``main() -> None`` that measures its
subject and, in the same run, a baseline doing the comparable minimum (a raw
confluent-kafka consume loop, plain Redis round trips, ...) and, where one
exists, the best peer on the same workload (a Quix Streams application,
bench/anchor/), and prints one line per
figure. Results are ratios against that baseline, so they compare across
machines; keep the latest figures with the machine description in
bench/RESULTS.md.
"""
