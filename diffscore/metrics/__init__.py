"""Sample-quality metrics: Frechet distances (FID, FD-digits, FID-k), KID, IS, memorization."""
