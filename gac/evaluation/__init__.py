"""Scoring SAR → optical translations: the metrics and their directions, the classical baseline, the ablation table
and the figures. Used by validation, sweeps and ``gac evaluate`` alike; it knows no registry and runs no model."""
