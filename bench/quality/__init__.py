"""Quality benchmarks: qtune against the peers a user would train with instead (`python -m bench.quality`)."""
