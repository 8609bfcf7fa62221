"""Model builders: every network is built by name through TerraTorch's registries, configured from ``params.yaml``."""
