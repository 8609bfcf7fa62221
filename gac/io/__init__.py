"""The bottom of GAC: how results reach disk and MLflow (atomic writes, locks, shard stores, GeoTIFFs, provenance,
the tracking store). Nothing here knows what a stage or a model is."""
