"""The saved settings of a DiffusionModule in today's form, whatever main wrote them.

Until 2026-12 the module took its sampler settings, non-finite-loss policy, speed switches and preconditioning as
flat arguments (``num_steps``, ``nan_policy``, ``compile``, ``precond`` + ``precond_kwargs``, ...) and picked its
augmentation by a string (``augment: nonleaky+scoreaug`` with ``nonleaky``/``scoreaug`` beside it). Today they are
groups (``sampling``, ``nonfinite``, ``speed``, ``precond``) and a list of augmenter records (``augment``).
``modern_settings`` maps the old form onto the new one, so checkpoints of either load, sample and resume.
"""

from __future__ import annotations

from typing import Any

from diffscore.errors import DiffscoreError

SAMPLING = {"sampler": "sampler", "num_steps": "steps", "sampler_kwargs": "sampler_kwargs", "sigma_min": "sigma_min"}
SAMPLING |= {"sigma_max": "sigma_max", "rho": "rho", "sampling_precision": "precision"}
NONFINITE = {"nan_policy": "policy", "nan_check_every": "check_every", "max_bad_steps": "max_bad_steps"}
SPEED = {"compile": "compile", "channels_last": "channels_last", "fused_norm": "fused_norm"}
DEFAULT_AUGMENTERS = {  # what the old string arms built when their object was not configured
    "nonleaky": {"class_path": "diffscore.core.augment.NonLeakyAugment", "init_args": {}},
    "scoreaug": {"class_path": "diffscore.core.augment.ScoreAugment", "init_args": {}},
}


def _group(settings: dict[str, Any], names: dict[str, str], group: str) -> None:
    """Move the flat ``names`` of ``settings`` into ``settings[group]`` under their new names (in place)."""
    moved = {new: settings.pop(old) for old, new in names.items() if old in settings}
    if moved:
        settings[group] = {**moved, **(settings.get(group) or {})}


def _augmenters(settings: dict[str, Any], configured: list[Any]) -> list[Any]:
    arm = settings.pop("augment", "none")
    records = {name: settings.pop(name, None) for name in ("nonleaky", "scoreaug")}
    if not isinstance(arm, str):  # today's form: already a list
        return arm
    parts = [p for p in arm.split("+") if p != "none"]
    unknown = set(parts) - set(records)
    if unknown:
        raise DiffscoreError(f"saved model setting augment={arm!r} names no known augmentation {sorted(unknown)}")
    for record in configured:  # an arm whose object was not saved trained with the config's (or the default)
        name = "scoreaug" if str(record.get("class_path", "")).endswith("ScoreAugment") else "nonleaky"
        records[name] = records[name] or record
    return [records[p] or DEFAULT_AUGMENTERS[p] for p in ("nonleaky", "scoreaug") if p in parts]


def modern_settings(settings: dict[str, Any], configured: list[Any] | None = None) -> dict[str, Any]:
    """A copy of a DiffusionModule's saved settings (``hyper_parameters``) in today's form. Main before 2026-12
    saved an arm's augmenter only when the config named one, and used the config's object on resume: ``configured``
    (the augmenter records of the config a run resumes with) supplies it again."""
    out = {k: v for k, v in settings.items() if k != "_instantiator"}
    _group(out, SAMPLING, "sampling")
    _group(out, NONFINITE, "nonfinite")
    _group(out, SPEED, "speed")
    if "augment" in out or "nonleaky" in out or "scoreaug" in out:
        out["augment"] = _augmenters(out, [r for r in configured or [] if isinstance(r, dict)])
    if isinstance(out.get("precond"), str) or "precond_kwargs" in out:
        out["precond"] = {"name": out.get("precond", "edm"), "kwargs": out.pop("precond_kwargs", None)}
    return out
