"""Reading checkpoints safely and rebuilding the model or data they name.

A checkpoint is read with ``weights_only=True`` (tensors and plain containers); a file that needs full unpickling is
refused unless the user trusts it. The classes a checkpoint's config names are looked up in an explicit list per
role (the backbones, augmenters and data modules diffscore ships, under their current and their 2026-11 names)
before anything is imported, and their arguments must be plain data that the constructor names.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from diffscore.errors import DiffscoreError
from diffscore.networks.backbone import plain_data

_UNET, _ADM = "diffscore.networks.unet:UNet", "diffscore.networks.adm:ADMUNet"
_MLP, _THEORY = "diffscore.networks.mlp:MLP", "diffscore.networks.theory_net:TheoryNet"
_TENSOR, _IMAGES = "diffscore.lit.data.tensor", "diffscore.lit.data.images"
_MUSIC = "diffscore.lit.data.musicscore:MusicScoreDataModule"

# role -> {class path a config may name: "module:attribute" it means}
ALLOWED: dict[str, dict[str, str]] = {
    "backbone": {
        "diffscore.networks.UNet": _UNET,
        "diffscore.networks.unet.UNet": _UNET,
        "diffscore.networks.ADMUNet": _ADM,
        "diffscore.networks.adm.ADMUNet": _ADM,
        "diffscore.networks.MLP": _MLP,
        "diffscore.networks.mlp.MLP": _MLP,
        "diffscore.networks.TheoryNet": _THEORY,
        "diffscore.networks.theory_net.TheoryNet": _THEORY,
    },
    "augment": {
        "diffscore.core.augment.NonLeakyAugment": "diffscore.core.augment:NonLeakyAugment",
        "diffscore.core.augment.ScoreAugment": "diffscore.core.augment:ScoreAugment",
    },
    "data": {
        **{
            f"{prefix}.{name}": f"{module}:{name}"
            for module, names in (
                (_TENSOR, ("DigitsDataModule", "GMMDataModule")),
                (_IMAGES, ("ImageDataModule", "CIFAR10DataModule")),
            )
            for name in names
            for prefix in ("diffscore.lit", "diffscore.lit.data", module)
        },
        **{p: _MUSIC for p in ("diffscore.lit.MusicScoreDataModule", "diffscore.lit.data.MusicScoreDataModule")},
        "diffscore.lit.data.musicscore.MusicScoreDataModule": _MUSIC,
        "diffscore.lit.distill_data.DistillBatches": "diffscore.lit.data.distill:DistillBatches",
        "diffscore.lit.data.DistillBatches": "diffscore.lit.data.distill:DistillBatches",
        "diffscore.lit.data.distill.DistillBatches": "diffscore.lit.data.distill:DistillBatches",
    },
}


def is_edm_pickle(path: str | Path) -> bool:
    """An NVlabs/edm network pickle is named ``*.pkl``; diffscore's own checkpoints are ``*.ckpt``."""
    return Path(path).suffix == ".pkl"


def read_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """The checkpoint dict; full unpickling (which can run code) only with ``trust``.

    The last file read is kept (keyed by path and modification time), so a command that needs both the model
    and the data of one checkpoint reads a multi-GB file once. Treat the result as read-only.
    """
    path = Path(path)
    if not path.is_file():
        raise DiffscoreError(f"checkpoint {path} does not exist; pass the .ckpt written by `diffscore fit`")
    if is_edm_pickle(path):
        raise DiffscoreError(
            f"{path} is an NVlabs/edm network pickle, not a diffscore checkpoint: it has no training state or data "
            f"(`diffscore convert --src {path} --out X.ckpt` writes one)"
        )
    return _read_cached(path.resolve(), path.stat().st_mtime_ns, trust)


def _check_torch_file(path: Path) -> None:
    """Raise unless the file is one torch.save writes: a ZIP archive (torch >= 1.6), or a pickle (protocol >= 2)
    of the legacy format."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    if zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return
    if head == b"PK":
        raise DiffscoreError(f"{path} is a damaged or truncated checkpoint (an incomplete copy or write?)")
    raise DiffscoreError(f"{path} is not a checkpoint (not a file torch.save writes); pass a .ckpt of `diffscore fit`")


@functools.lru_cache(maxsize=1)
def _read_cached(path: Path, mtime_ns: int, trust: bool) -> dict[str, Any]:
    unreadable = f"{path} is not a readable checkpoint"
    _check_torch_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:  # damaged, not merely holding objects
            raise DiffscoreError(f"{unreadable} (damaged or truncated: {str(e).splitlines()[-1][:120]})") from None
        if not trust:
            raise DiffscoreError(
                f"{path} holds objects beyond tensors and plain data ({found.group(1)}); loading it could run code. "
                "If you trust the file, pass --trust_checkpoint true"
            ) from None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a trusted file may still be damaged
            raise DiffscoreError(f"{unreadable} ({type(e).__name__}: {str(e)[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DiffscoreError(f"{unreadable} ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(ckpt, dict):
        raise DiffscoreError(f"{path} is not a diffscore checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


def resolve(class_path: str, role: str) -> type:
    """The class a config names for ``role``, if diffscore allows it there; imported only then."""
    target = ALLOWED[role].get(class_path)
    if target is None:
        raise DiffscoreError(
            f"{class_path!r} is not a {role} class diffscore builds from a file; allowed: "
            f"{', '.join(sorted({t.split(':')[1] for t in ALLOWED[role].values()}))}"
        )
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf} of a nested configuration (dicts or jsonargparse Namespaces; lists are leaves, tuples become
    lists), for comparing two of them key by key."""
    if hasattr(tree, "as_dict"):
        tree = tree.as_dict()
    if not isinstance(tree, dict):
        return {prefix: list(tree) if isinstance(tree, tuple) else tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def same_class(a: str, b: str) -> bool:
    """Two spellings of one class path (``diffscore.networks.UNet`` and ``diffscore.networks.unet.UNet``; the
    LightningModules under ``diffscore.lit`` and ``diffscore.lit.modules``)."""
    if a == b:
        return True
    targets = [{ALLOWED[r].get(p) for r in ALLOWED} - {None} for p in (a, b)]
    if targets[0] & targets[1]:
        return True
    module_a, _, name_a = a.rpartition(".")
    module_b, _, name_b = b.rpartition(".")
    lit = ("diffscore.lit", "diffscore.lit.modules")
    return name_a == name_b and module_a.startswith(lit) and module_b.startswith(lit)


def _allowed_anywhere(class_path: str) -> bool:
    if any(class_path in ALLOWED[role] for role in ALLOWED):
        return True
    module, _, name = class_path.rpartition(".")  # an optimizer or LR schedule torch ships
    if module in ("torch.optim", "torch.optim.lr_scheduler"):
        return isinstance(getattr(importlib.import_module(module), name, None), type)
    return False


def check_class_paths(tree: Any, where: str) -> None:
    """Refuse a saved configuration that names a class diffscore does not build from a file (checked before
    anything it names is imported)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("class_path", "_class_path") and not (isinstance(value, str) and _allowed_anywhere(value)):
                raise DiffscoreError(f"{where} names {value!r}, a class diffscore does not build from a file")
            check_class_paths(value, where)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            check_class_paths(value, where)


def build(config: dict[str, Any], role: str) -> Any:
    """Instantiate ``{"class_path": ..., "init_args": {...}}`` (or Lightning's flat ``_class_path`` form) of an
    allowed class for ``role``, with plain-data arguments that its constructor names."""
    if not isinstance(config, dict):
        raise DiffscoreError(f"a {role} configuration must be a mapping, got {type(config).__name__}")
    if "_class_path" in config:
        class_path = config["_class_path"]
        init = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        class_path, init = config.get("class_path"), config.get("init_args") or {}
    if not isinstance(class_path, str) or not isinstance(init, dict):
        raise DiffscoreError(f"the {role} configuration names no class_path: {config!r:.200}")
    cls = resolve(class_path, role)
    params = inspect.signature(cls.__init__).parameters
    for key, value in init.items():
        if key not in params or key == "self":
            raise DiffscoreError(f"{class_path} has no argument {key!r} (saved in the file)")
        if not plain_data(value):
            raise DiffscoreError(f"{class_path} argument {key!r} is not plain data ({type(value).__name__})")
    try:
        return cls(**init)
    except Exception as e:  # any failure of the saved arguments (negative or unallocatable sizes) is one line
        raise DiffscoreError(f"{class_path} rejects the saved arguments ({str(e)[:200]})") from None


def load_model(path: str | Path, trust: bool = False):
    """The model a file holds, ready to sample: a DiffusionModule with the EMA weights of a `diffscore fit`
    checkpoint or of an NVlabs/edm network pickle (``*.pkl``, read without running its code), or the
    OneStepGenerator of a DisBack checkpoint (NFE = 1)."""
    from diffscore.lit.modules.diffusion import DiffusionModule
    from diffscore.lit.modules.one_step import OneStepGenerator

    if is_edm_pickle(path):
        from diffscore.lit.edm_network import load_edm_network

        return load_edm_network(path)
    ckpt = read_checkpoint(path, trust)
    if "one_step_generator" in ckpt:
        info = ckpt["one_step_generator"]
        model = OneStepGenerator(build(info["backbone"], "backbone"), info["sigma_data"], info["sigma_init"])
        prefix = "generator."
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        _load_weights(model.generator, state, path, "the generator's")
        return model
    hp = ckpt.get("hyper_parameters") or {}
    owner = hp.get("_class_path", "diffscore.lit.DiffusionModule")
    if not str(owner).endswith("DiffusionModule") or "backbone" not in hp or "state_dict" not in ckpt:
        held = owner if "backbone" in hp else "no backbone config"
        raise DiffscoreError(
            f"{path} is not a diffscore DiffusionModule checkpoint (it holds {held}); "
            "pass a checkpoint written by `diffscore fit`"
        )
    backbone = build(hp["backbone"], "backbone")
    params = inspect.signature(DiffusionModule.__init__).parameters
    kwargs = {k: v for k, v in hp.items() if k in params and k not in ("self", "backbone", "optimizer")}
    for key in ("nonleaky", "scoreaug"):
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = build(kwargs[key], "augment")
    model = DiffusionModule(backbone, **kwargs)
    _load_weights(model, ckpt["state_dict"], path, "the")
    return model


def _load_weights(module: torch.nn.Module, state: dict[str, Any], path: str | Path, whose: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DiffscoreError(f"{path}: {whose} weights do not fit the saved configuration ({str(e)[:200]})") from None


def training_data(
    path: str | Path,
    data: str | None = None,
    trust: bool = False,
    shape: tuple | None = None,
    what_to_pass: str = "--data PATH (an EDM dataset ZIP or folder)",
):
    """The training data of a model file: the data set at ``data`` (an EDM ZIP or folder of PNGs) if given, else
    the DataModule its checkpoint names; checked against the model's data ``shape``. Raises if there is none,
    saying to pass ``what_to_pass``."""
    if data is not None:
        from diffscore.lit.data.images import ImageDataModule

        dm = ImageDataModule(data, num_workers=0, pin_memory=False)
    else:
        dm = load_checkpoint_datamodule(path, trust)
    if dm is None:
        kind = "an NVlabs/edm network pickle never names" if is_edm_pickle(path) else "it does not name"
        raise DiffscoreError(f"{path}: {kind} its training data; pass {what_to_pass}")
    if shape is not None and tuple(dm.data_shape) != tuple(shape):
        raise DiffscoreError(f"the data are {list(dm.data_shape)} images but the model makes {list(shape)}")
    return dm


def config_datamodule(path: str | Path, option: str = "--data_config"):
    """The DataModule the ``data:`` section of a training YAML names (an allowed class, plain arguments)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DiffscoreError(f"{option} {path} does not exist; pass a YAML with a data: section")
    try:
        section = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data")
    except (UnicodeDecodeError, yaml.YAMLError, AttributeError) as e:
        raise DiffscoreError(f"{option} {path} is not a YAML mapping ({type(e).__name__})") from None
    if not isinstance(section, dict):
        raise DiffscoreError(f"{option} {path} has no data: section; pass a training config")
    return build(section, "data")


def load_checkpoint_datamodule(path: str | Path, trust: bool = False):
    """The DataModule a checkpoint was trained on (None if it does not say, as EDM's network pickles do not).

    Unless the file is trusted it is built so that it writes nothing (its class's ``WRITE_ARGS``: no synthetic
    data, no shard extraction); the paths it reads are printed."""
    if is_edm_pickle(path):
        return None
    hp = read_checkpoint(path, trust).get("datamodule_hyper_parameters")
    if not hp or "_class_path" not in hp:
        return None
    config = dict(hp)
    if not trust:
        for key, inert in getattr(resolve(config["_class_path"], "data"), "WRITE_ARGS", {}).items():
            if key in config and config[key] != inert:
                print(
                    f"diffscore: not applying the checkpoint's data.{key}={config[key]!r} (it writes files; "
                    "--trust_checkpoint true allows it)",
                    flush=True,
                )
            config[key] = inert
    named = {k: config[k] for k in ("path", "root", "cache_dir") if config.get(k)}
    if named:
        print(f"diffscore: the checkpoint's data: {config['_class_path'].rsplit('.', 1)[-1]} {named}", flush=True)
    return build(config, "data")
