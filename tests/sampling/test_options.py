"""The sampling options are checked once, when they are built: a bad value is one line naming the option."""

from __future__ import annotations

import math

import pytest

from diffscore.errors import DiffscoreError
from diffscore.sampling.options import SamplerDefaults, SamplingOptions, TeleportOptions


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"sampler": "dpm9"}, "--sampler 'dpm9' is unknown"),
        ({"steps": 0}, "--steps must be an integer >= 1"),
        ({"steps": True}, "--steps must be an integer >= 1"),
        ({"batch_size": -2}, "--batch_size must be an integer >= 1"),
        ({"sampler_kwargs": {"s_churn": math.nan}}, "s_churn must be a finite number"),
        ({"sampler_kwargs": {"s_churn": "40"}}, "s_churn must be a finite number"),
        ({"sampler_kwargs": [1, 2]}, "must be a JSON object"),
        ({"sigma_min": 0.0}, "--sigma_min must be a positive number"),
        ({"sigma_max": math.inf}, "--sigma_max must be a positive number"),
        ({"sigma_min": 5.0, "sigma_max": 1.0}, "must be below --sigma_max"),
        ({"class_label": -1}, "--class_label must be an integer >= 0"),
        ({"guidance": math.nan}, "--guidance must be a finite number"),
        ({"precision": "16"}, "--precision must be bf16 or 32"),
    ],
)
def test_bad_sampling_options_are_one_line_naming_the_option(kwargs, needle):
    with pytest.raises(DiffscoreError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        SamplingOptions(**kwargs)


def test_s_max_may_be_infinite_and_the_defaults_are_the_model_s():
    options = SamplingOptions(sampler_kwargs={"s_churn": 40, "s_max": math.inf})
    assert options.sampler is None and options.steps is None and options.teleport == TeleportOptions()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"skip": 2, "sigma": 8.0}, "not both"),
        ({"skip": -1}, "--teleport.skip must be an integer >= 0"),
        ({"sigma": -1.0}, "--teleport.sigma must be a positive number"),
        ({"rank": 0}, "--teleport.rank must be an integer >= 1"),
    ],
)
def test_bad_teleport_options_are_one_line(kwargs, needle):
    with pytest.raises(DiffscoreError, match=needle):
        TeleportOptions(**kwargs)


def test_a_model_s_own_settings_are_checked_too():
    assert SamplerDefaults().steps == 18 and SamplerDefaults().sampler == "heun"
    with pytest.raises(DiffscoreError, match="sampler steps must be an integer >= 1"):
        SamplerDefaults(steps=0)
    with pytest.raises(DiffscoreError, match="sigma_min 80.0 must be below sigma_max 1.0"):
        SamplerDefaults(sigma_min=80.0, sigma_max=1.0)
