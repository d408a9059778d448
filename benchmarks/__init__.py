"""Benchmarks (not shipped in the wheel): run one with ``.venv/bin/python -m benchmarks.<name> --help``.

Performance is measured here, as ratios within one run against the limits of the same machine
(never with timed assertions in tests): save/load against the disk (save_load.py, disk.py),
planning (planning.py), inspect/diff at a million items (index_scale.py); suite.py runs those
three (``dcp-forge bench`` from a source checkout); async_save.py, read_once.py, replication.py, s3.py
and s3_clients.py measure one subsystem each. Tables and method: docs/PERFORMANCE.md.
"""
