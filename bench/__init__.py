"""The benchmark suite: `python -m bench` (or `make bench`), `python -m bench --smoke`.

Every figure is a ratio against a baseline measured in the same run, on the same broker and the
same database, because this machine is small (2 cores) and shared. See docs/performance.md.
"""
