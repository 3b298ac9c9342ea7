"""Data modules named by a file: a checkpoint's data section, or the ``data:`` section of a training YAML.

Only the data modules of ``DATA_MODULES`` are built, with plain arguments. Unless the checkpoint was trusted, a
module is built so that it writes nothing (its class's ``WRITE_ARGS``: no synthetic pages, no shard extraction),
and the paths it reads are printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule

from diffscore.data.latent_dataset import read_meta
from diffscore.errors import DiffscoreError
from diffscore.lit.datamodules.images import ImageDataModule
from diffscore.lit.datamodules.latents import LatentDataModule
from diffscore.loading.classes import ClassTable, build, class_and_arguments, resolve, spellings
from diffscore.loading.model import LoadedModel

_OLD = ("diffscore.lit", "diffscore.lit.data", "diffscore.lit.datamodules")  # 2026-11 and 2026-12 spellings too
DATA_MODULES: ClassTable = {
    **spellings("diffscore.lit.datamodules.tensor", "DigitsDataModule", *_OLD, "diffscore.lit.data.tensor"),
    **spellings("diffscore.lit.datamodules.tensor", "GMMDataModule", *_OLD, "diffscore.lit.data.tensor"),
    **spellings("diffscore.lit.datamodules.images", "ImageDataModule", *_OLD, "diffscore.lit.data.images"),
    **spellings("diffscore.lit.datamodules.images", "CIFAR10DataModule", *_OLD, "diffscore.lit.data.images"),
    **spellings("diffscore.lit.datamodules.musicscore", "MusicScoreDataModule", *_OLD, "diffscore.lit.data.musicscore"),
    **spellings("diffscore.lit.datamodules.distill", "DistillBatches", *_OLD[1:], "diffscore.lit.data.distill"),
    **spellings("diffscore.lit.datamodules.latents", "LatentDataModule", "diffscore.lit.datamodules"),
    "diffscore.lit.distill_data.DistillBatches": "diffscore.lit.datamodules.distill:DistillBatches",
}


def datamodule_from_section(section: Any, trust: bool = False) -> LightningDataModule:
    """The DataModule a data section names (``{"class_path", "init_args"}`` or Lightning's flat form)."""
    class_path, init = class_and_arguments(section, "data")
    config = {"class_path": class_path, "init_args": dict(init)}
    if not trust:
        inert_args = getattr(resolve(class_path, DATA_MODULES, "data"), "WRITE_ARGS", {})
        for key, inert in inert_args.items():
            if key in init and init[key] != inert:
                print(
                    f"diffscore: not applying the checkpoint's data.{key}={init[key]!r} (it writes files; "
                    "--trust_checkpoint true allows it)",
                    flush=True,
                )
            config["init_args"][key] = inert
    named = {k: init[k] for k in ("path", "root", "cache_dir") if init.get(k)}
    if named:
        print(f"diffscore: the model's data: {class_path.rsplit('.', 1)[-1]} {named}", flush=True)
    return build(config, DATA_MODULES, "data")


def config_datamodule(path: str | Path, option: str = "--data_config") -> LightningDataModule:
    """The DataModule the ``data:`` section of a training YAML names."""
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
    return datamodule_from_section(section, trust=True)  # the user's own config, not a file handed over


def model_datamodule(model: LoadedModel) -> LightningDataModule | None:
    """The DataModule a loaded model was trained on (None if it does not say, as EDM's network pickles do not)."""
    section = model.data_config
    if not section or ("_class_path" not in section and "class_path" not in section):
        return None
    return datamodule_from_section(section, model.trusted)


def training_data(
    model: LoadedModel, data: str | None = None, what_to_pass: str = "--data PATH (an EDM dataset ZIP or folder)"
) -> LightningDataModule:
    """The training data of a model: the data set at ``data`` (an EDM ZIP or folder of PNGs, or a latent dataset of
    `diffscore dataset --encode` for a latent model) if given, else the DataModule the model names; checked
    against the model's data shape. Raises if there is none, saying to pass ``what_to_pass``."""
    if data is not None and read_meta(data) is not None:
        dm = LatentDataModule(data, num_workers=0)
    elif data is not None:
        dm = ImageDataModule(data, num_workers=0, pin_memory=False)
    else:
        dm = model_datamodule(model)
    if dm is None:
        kind = "an NVlabs/edm network pickle never names" if model.kind == "edm-pickle" else "it does not name"
        raise DiffscoreError(f"{model.path}: {kind} its training data; pass {what_to_pass}")
    if tuple(dm.data_shape) != tuple(model.data_shape):
        kind = "latents" if isinstance(dm, LatentDataModule) else "images"
        hint = "; pass a latent dataset of its VAE (`diffscore dataset --encode`)" if model.decoder is not None else ""
        raise DiffscoreError(
            f"the data are {list(dm.data_shape)} {kind} but the model makes {list(model.data_shape)}{hint}"
        )
    return dm
