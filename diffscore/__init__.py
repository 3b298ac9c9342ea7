"""diffscore: score-based diffusion research on an EDM core, with PyTorch Lightning."""

__version__ = "0.1.0"
