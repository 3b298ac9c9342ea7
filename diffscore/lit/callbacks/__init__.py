"""Callbacks: EDM's EMA, EDM2's post-hoc EMA snapshots, sample grids, the run log and sample quality, the Gaussian
and NTK probes, and the checkpoint safety net. Configs name them as ``diffscore.lit.callbacks.<Class>``."""

from diffscore.lit.callbacks.ema import EDMEMA
from diffscore.lit.callbacks.gaussian_probe import GaussianScoreProbe
from diffscore.lit.callbacks.ntk_probe import NTKProbe
from diffscore.lit.callbacks.phema import PostHocEMA
from diffscore.lit.callbacks.resilience import AtomicCheckpointIO, PreemptionCheckpoint
from diffscore.lit.callbacks.run_log import RunLog, SampleQuality
from diffscore.lit.callbacks.sample_grid import SampleGrid

__all__ = [
    "EDMEMA",
    "AtomicCheckpointIO",
    "GaussianScoreProbe",
    "NTKProbe",
    "PostHocEMA",
    "PreemptionCheckpoint",
    "RunLog",
    "SampleGrid",
    "SampleQuality",
]
