"""Measurements of a trained score, without Lightning: how Gaussian it is (gaussian.py: explained variance against
the Gaussian, GMM and delta-mixture scores of the data, Wang & Vastola 2024) and its neural tangent kernel
(ntk.py: score error, kernel spectrum, alignment, drift and the kernel twin, Han, Razaviyayn & Xu 2024). The
callbacks of diffscore.lit.callbacks schedule them during fit; `diffscore probe` runs them on a checkpoint."""
