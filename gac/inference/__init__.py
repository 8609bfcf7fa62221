"""Applying models over caches: the one sharded, resumable engine, Stage 1 generation (tile by tile or as blended
mosaics) and the refinement of a cache by a trained stage."""
