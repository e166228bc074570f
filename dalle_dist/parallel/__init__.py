"""Parallelism applied from outside the single-device models: topology, sharding, pipelines, replica reduction."""
