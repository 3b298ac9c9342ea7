"""Readers of other projects' model files (Stable Diffusion folders) into diffscore backbones and denoisers."""
