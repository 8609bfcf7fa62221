"""GAC: Sentinel-1 SAR to Sentinel-2 optical in three stages (TerraMind → Prithvi LoRA → TerraMind grounding).

The package is layered (see ``[tool.importlinter]`` in ``pyproject.toml`` and ``docs/architecture.md``): ``cli`` →
``stages`` → ``mlops`` → ``inference`` → ``training`` → ``evaluation`` → ``models`` → ``data`` → ``io`` → ``config`` →
``pipeline``/``sensors``/``errors``; a module imports only from its own package or the layers below, at the top of the
file. Heavy third-party packages (TerraTorch, MLflow, Lightning, matplotlib) are imported where they are used, and the
CLI imports a stage only when its command runs, so ``gac --help`` answers at once.
"""

__version__ = "0.1.0"
