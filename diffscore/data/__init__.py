"""Datasets and readers (pure: tensors in, tensors out; Lightning wrappers live in diffscore.lit)."""
