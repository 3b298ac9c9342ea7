"""Reading checkpoints safely: tensors and plain containers only (``weights_only=True``), and classes rebuilt
from the config the checkpoint holds only if they are of the expected kind (a backbone must be an nn.Module,
data a LightningDataModule). A file that needs full unpickling is refused unless the user trusts it."""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import nn

from diffscore.errors import DiffscoreError


def read_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """The checkpoint dict; full unpickling (which can run code) only with ``trust``.

    The last file read is kept (keyed by path and modification time), so a command that needs both the model
    and the data of one checkpoint reads a multi-GB file once. Treat the result as read-only.
    """
    path = Path(path)
    if not path.is_file():
        raise DiffscoreError(f"checkpoint {path} does not exist; pass the .ckpt written by `diffscore fit`")
    return _read_cached(path.resolve(), path.stat().st_mtime_ns, trust)


@functools.lru_cache(maxsize=1)
def _read_cached(path: Path, mtime_ns: int, trust: bool) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        raise DiffscoreError(
            f"{path} holds objects beyond tensors and plain data ({str(e).splitlines()[0][:120]}); loading it could "
            "run code. If you trust the file, pass --trust_checkpoint true"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise DiffscoreError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


def build(config: dict[str, Any], base: type) -> Any:
    """Instantiate ``{"class_path": ..., "init_args": {...}}`` (or the flat ``_class_path`` form), checking that
    the class is a subclass of ``base`` before calling it."""
    if "_class_path" in config:
        class_path = config["_class_path"]
        init = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        class_path, init = config.get("class_path"), dict(config.get("init_args") or {})
    if not isinstance(class_path, str) or "." not in class_path:
        raise DiffscoreError(f"the configuration names no class_path: {config!r:.200}")
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise DiffscoreError(f"{class_path} cannot be imported") from None
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise DiffscoreError(f"{class_path} is not a {base.__name__}; refusing to call it")
    try:
        return cls(**init)
    except TypeError as e:
        raise DiffscoreError(f"{class_path} rejects the saved arguments ({e})") from None


def load_diffusion_checkpoint(path: str | Path, trust: bool = False):
    """The DiffusionModule of a `diffscore fit` checkpoint, with the EMA weights (``state_dict``); for a one-step
    distillation checkpoint (DisBackModule), its generator as a OneStepGenerator (NFE = 1)."""
    from diffscore.core.augment import NonLeakyAugment, ScoreAugment
    from diffscore.lit.diffusion import DiffusionModule

    ckpt = read_checkpoint(path, trust)
    if "one_step_generator" in ckpt:
        from diffscore.lit.disback import load_one_step_generator

        return load_one_step_generator(ckpt, path)
    hp = ckpt.get("hyper_parameters") or {}
    owner = hp.get("_class_path", "diffscore.lit.DiffusionModule")
    if not owner.endswith("DiffusionModule") or "backbone" not in hp or "state_dict" not in ckpt:
        held = owner if "backbone" in hp else "no backbone config"
        raise DiffscoreError(
            f"{path} is not a diffscore DiffusionModule checkpoint (it holds {held}); "
            "one built in Python loads with DiffusionModule.load_from_checkpoint(path, backbone=...)"
        )
    backbone = build(hp["backbone"], nn.Module)
    params = inspect.signature(DiffusionModule.__init__).parameters
    kwargs = {k: v for k, v in hp.items() if k in params and k not in ("self", "backbone", "optimizer")}
    for key, cls in (("nonleaky", NonLeakyAugment), ("scoreaug", ScoreAugment)):
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = build(kwargs[key], cls)
    model = DiffusionModule(backbone, **kwargs)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise DiffscoreError(f"{path}: the weights do not fit the saved configuration ({str(e)[:200]})") from None
    return model


def load_checkpoint_datamodule(path: str | Path, trust: bool = False) -> LightningDataModule | None:
    """The DataModule a checkpoint was trained on (None if it does not say)."""
    hp = read_checkpoint(path, trust).get("datamodule_hyper_parameters")
    return build(dict(hp), LightningDataModule) if hp and "_class_path" in hp else None
