"""The classes a file may name, and building them from plain data.

A checkpoint records how its backbone (and augmentation) were built as ``{"class_path": ..., "init_args": {...}}``.
Such a record is turned into an object only through an explicit table of the classes diffscore builds from a
file (``ClassTable``: every spelling a config may use -> "module:attribute"), with arguments that are plain data
and that the constructor names; nothing the file names is imported unless the table allows it. The tables of the
backbones and augmenters are here; diffscore.lit.datamodules.from_file has the data modules'.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from diffscore.errors import DiffscoreError
from diffscore.networks.backbone import plain_data

ClassTable = dict[str, str]  # class path a config may name -> "module:attribute" it means


def spellings(module: str, name: str, *prefixes: str) -> ClassTable:
    """``{prefix.name: module:name}`` for the module itself and each package prefix that re-exports ``name``."""
    return {f"{prefix}.{name}": f"{module}:{name}" for prefix in (module, *prefixes)}


BACKBONES: ClassTable = {
    **spellings("diffscore.networks.unet", "UNet", "diffscore.networks"),
    **spellings("diffscore.networks.adm", "ADMUNet", "diffscore.networks"),
    **spellings("diffscore.networks.mlp", "MLP", "diffscore.networks"),
    **spellings("diffscore.networks.theory_net", "TheoryNet", "diffscore.networks"),
}
AUGMENTERS: ClassTable = {
    **spellings("diffscore.core.nonleaky_augment", "NonLeakyAugment", "diffscore.core.augment"),
    **spellings("diffscore.core.augment", "ScoreAugment"),
}


def resolve(class_path: Any, table: ClassTable, role: str) -> type:
    """The class ``class_path`` means in ``table``; imported only if the table has it."""
    target = table.get(class_path) if isinstance(class_path, str) else None
    if target is None:
        allowed = ", ".join(sorted({t.split(":")[1] for t in table.values()}))
        raise DiffscoreError(f"{class_path!r} is not a {role} class diffscore builds from a file; allowed: {allowed}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def class_and_arguments(config: Any, role: str) -> tuple[str, dict[str, Any]]:
    """(class path, init arguments) of ``{"class_path", "init_args"}`` or Lightning's flat ``_class_path`` form."""
    if not isinstance(config, dict):
        raise DiffscoreError(f"a {role} configuration must be a mapping, got {type(config).__name__}")
    if "_class_path" in config:
        class_path, init = config["_class_path"], {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        class_path, init = config.get("class_path"), config.get("init_args") or {}
    if not isinstance(class_path, str) or not isinstance(init, dict):
        raise DiffscoreError(f"the {role} configuration names no class_path: {config!r:.200}")
    return class_path, init


def build(config: Any, table: ClassTable, role: str) -> Any:
    """Instantiate a record of an allowed class of ``table`` with plain-data arguments its constructor names."""
    class_path, init = class_and_arguments(config, role)
    cls = resolve(class_path, table, role)
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


def config_differences(a: Any, b: Any, limit: int = 4) -> list[str]:
    """'key A vs B' for the first ``limit`` keys where two configurations differ."""
    fa, fb = flat_config(a or {}), flat_config(b or {})
    return [f"{k} {fa.get(k)} vs {fb.get(k)}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)][:limit]
