"""GAC: Sentinel-1 SAR to Sentinel-2 optical in three stages (TerraMind → Prithvi LoRA → TerraMind grounding).

Importing :mod:`gac` is cheap on purpose: torch, TerraTorch and MLflow are imported inside the functions that need
them, so ``gac --help`` answers at once.
"""

__version__ = "0.1.0"
