"""Bags on storage: record format, shards + manifest, sources, loaders and packing."""
