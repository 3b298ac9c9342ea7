"""NVlabs/edm-format network pickles written by the tests, without EDM installed.

``edm_class`` stand-ins record their constructor arguments as ``torch_utils.persistence.persistent_class`` does;
``EDMPickler`` pickles them as that module's ``__reduce__`` does: a call of
``_reconstruct_persistent_obj(dict(type='class', version=6, module_src=..., class_name=..., state=obj.__dict__))``.
``write_edm_network`` writes a whole network (a preconditioning around SongUNet / DhariwalUNet) from an EDM-layout
state dict, as EDM's training loop pickles it.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import sys
import types
from pathlib import Path

import torch

PERSISTENCE = "torch_utils.persistence"
EDM_SRC = "# the source of training/networks.py would be here\nimport torch\n"


def edm_class(cls):
    """Record constructor arguments as ``persistence.persistent_class`` does, and mark the class persistent."""
    init = cls.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._init_args, self._init_kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)

    cls.__init__, cls._edm_persistent = recording_init, True
    return cls


@contextlib.contextmanager
def fake_persistence(reconstruct=None):
    """A ``torch_utils.persistence`` module in sys.modules only while this block runs."""

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the reader must never call the pickled reconstruct hook")

    fn = reconstruct or _reconstruct_persistent_obj
    fn.__module__, fn.__name__, fn.__qualname__ = (
        PERSISTENCE,
        "_reconstruct_persistent_obj",
        "_reconstruct_persistent_obj",
    )
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType(PERSISTENCE)
    mod._reconstruct_persistent_obj, pkg.persistence = fn, mod
    sys.modules.update({"torch_utils": pkg, PERSISTENCE: mod})
    try:
        yield
    finally:
        del sys.modules[PERSISTENCE], sys.modules["torch_utils"]


class EDMPickler(pickle.Pickler):
    """Pickles ``edm_class`` objects as EDM's persistent classes do; ``tamper(meta) -> meta`` edits what is written."""

    def __init__(self, file, protocol, module_src=EDM_SRC, tamper=None):
        super().__init__(file, protocol=protocol)
        self.module_src, self.tamper = module_src, tamper

    def reducer_override(self, obj):
        if not getattr(type(obj), "_edm_persistent", False):
            return NotImplemented
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=type(obj).__name__)
        meta["state"] = dict(obj.__getstate__())  # what object.__reduce__ hands to persistence
        meta = self.tamper(meta) if self.tamper else meta
        return sys.modules[PERSISTENCE]._reconstruct_persistent_obj, (meta,)


def dump_edm(path: Path, obj, protocol=pickle.DEFAULT_PROTOCOL, **kwargs) -> Path:
    with fake_persistence(), path.open("wb") as f:
        EDMPickler(f, protocol, **kwargs).dump(obj)
    assert "torch_utils" not in sys.modules
    return path


@edm_class
class Node(torch.nn.Module):
    """A module of an EDM network that only holds parameters and children (its class name is not read)."""

    def __init__(self) -> None:
        super().__init__()


def _persistent_class(name: str) -> type:
    """An ``edm_class`` stand-in named like EDM's class (SongUNet, EDMPrecond, ...) that takes any kwargs."""

    def init(self, **kwargs) -> None:
        torch.nn.Module.__init__(self)

    return edm_class(type(name, (torch.nn.Module,), {"__init__": init}))


def module_tree(root: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Fill ``root`` with children and parameters so that its state_dict() is ``state`` (same keys)."""
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, Node())
            node = node._modules[part]
        node.register_parameter(leaf, torch.nn.Parameter(tensor.detach().clone(), requires_grad=False))
    return root


def write_edm_network(
    path: Path,
    precond: str,
    precond_kwargs: dict,
    backbone: str,
    backbone_kwargs: dict,
    backbone_state: dict[str, torch.Tensor],
    extra_state: dict[str, torch.Tensor] | None = None,
    module_src: str = EDM_SRC,
) -> Path:
    """``pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=...))`` of a network whose
    preconditioning record is ``precond(**precond_kwargs)`` around ``backbone(**backbone_kwargs)``."""
    net = _persistent_class(precond)(**precond_kwargs)
    for key, value in precond_kwargs.items():
        setattr(net, key, value)
    for key, tensor in (extra_state or {}).items():  # e.g. iDDPM's u table
        net.register_buffer(key, tensor)
    net.model = module_tree(_persistent_class(backbone)(**backbone_kwargs), backbone_state)
    data = dict(ema=net.eval(), loss_fn=None, augment_pipe=None, dataset_kwargs=dict(path="datasets/x.zip"))
    return dump_edm(path, data, module_src=module_src)
