"""Base diffusion models: the embedded shapes model, its recipe, and the loader."""
