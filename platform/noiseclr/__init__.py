"""NoiseCLR platform: unsupervised discovery of interpretable directions in diffusion models."""

__version__ = "0.1.0"
