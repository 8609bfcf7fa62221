"""The pipeline's stages, one module each (``run`` does the stage's whole job: compute, record provenance, write
DVC metrics, log the MLflow run); the facts about each stage are in :mod:`gac.pipeline`. ``gac.cli`` only turns flags
into params and calls these."""
