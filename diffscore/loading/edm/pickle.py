"""Read NVlabs/edm network pickles (``network-snapshot-*.pkl``, ``edm-*.pkl``, ``baseline-*.pkl``) without running them.

The format (NVlabs/edm ``training/training_loop.py``, ``torch_utils/persistence.py``):

- The file is ``pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=dict(...)), f)``
  (default protocol; ``net`` on the CPU, eval mode, ``requires_grad`` off).
- Every EDM class (EDMPrecond/VPPrecond/VEPrecond/iDDPMPrecond, SongUNet/DhariwalUNet, UNetBlock, Conv2d, Linear,
  GroupNorm, Positional/FourierEmbedding, EDMLoss/VPLoss/VELoss, AugmentPipe) is a *persistent class*: its
  ``__reduce__`` emits ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = dict(type='class',
  version=6, module_src=<the whole source of the defining module>, class_name=..., state=<the object's __dict__>)``.
  The state holds the constructor arguments (``_init_args``, ``_init_kwargs``), the plain attributes and, for
  ``nn.Module``\\ s, ``_parameters``, ``_buffers``, ``_non_persistent_buffers_set``, ``_modules`` and hook dicts.
  EDM's loader ``exec``\\ s ``module_src``: a plain ``pickle.load`` runs whatever code the file carries.
- Plain torch containers (``torch.nn.ModuleDict`` for the U-Nets' ``enc``/``dec``) are pickled by reference:
  NEWOBJ of ``torch.nn.modules.container.ModuleDict``, then BUILD with its ``__dict__``.
- Tensors use torch's plain-pickle form: ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
  requires_grad, hooks[, metadata])``, Parameters ``torch._utils._rebuild_parameter(data, requires_grad, hooks)``,
  storages ``torch.storage._load_from_bytes(<bytes of a legacy torch.save of the storage>)``. Numpy scalars
  (e.g. ``skip_scale=np.sqrt(0.5)``) are ``numpy._core.multiarray.scalar(numpy.dtype(...), bytes)``.

Read with unpickler.py's restricted unpickler (the allow-list of globals, the checked tensor
rebuilders, BUILD only where EDM's format needs it, the limit on the network a file may declare relative to its
size); ``torch_utils.persistence._reconstruct_persistent_obj`` resolves to :func:`_reconstruct`: an inert
:class:`PersistentRecord`, ``module_src`` hashed, never executed; torch.nn stand-ins become records
(``source_sha256=''``).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffscore.errors import DiffscoreError
from diffscore.io import check_finite_weights, open_user_file
from diffscore.loading.edm.unpickler import (
    InvalidPickleError,
    RefusedGlobalError,
    RestrictedUnpickler,
    TorchObject,
    one_line,
)

TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of a legacy (non-zip) torch.save file
MAX_ELEMENTS_PER_BYTE = 1.0  # tensor elements a file may declare per byte of its size (unpickler.py's docstring)
PERSISTENT_HOOK = "torch_utils.persistence._reconstruct_persistent_obj"


@dataclass(frozen=True, eq=False, repr=False)
class PersistentRecord:
    """An inert stand-in for one pickled EDM object (or a plain ``torch.nn`` container inside one).

    ``state`` is the object's ``__dict__`` as pickled, less ``_init_args``/``_init_kwargs`` (which are
    ``init_args``/``init_kwargs`` here); its ``_modules`` values are records again (or None).
    """

    module_name: str  # "" for EDM classes (the pickle does not say); "torch.nn.modules.container" etc. for torch
    class_name: str  # e.g. "EDMPrecond", "SongUNet", "ModuleDict"
    init_args: tuple  # positional constructor arguments (EDM records them; () for torch classes)
    init_kwargs: dict[str, Any]  # keyword constructor arguments
    state: dict[str, Any]  # the object's __dict__: attributes, _parameters, _buffers, _modules, ...
    source_sha256: str = ""  # first 16 hex digits of sha256(module_src); "" for a plain torch class

    def __repr__(self) -> str:
        return f"PersistentRecord({describe(self)})"


def _reconstruct(meta: Any) -> PersistentRecord:
    """Stands in for ``torch_utils.persistence._reconstruct_persistent_obj``: a record, no ``exec``."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise InvalidPickleError("a persistent object whose meta is not a dict(type='class', ...) as EDM writes")
    class_name, src, state = meta.get("class_name"), meta.get("module_src"), meta.get("state")
    if not isinstance(src, str):  # a missing/odd class_name is reported by _check_record
        raise InvalidPickleError(f"{class_name}: module_src is a {type(src).__name__}, not source text")
    if not isinstance(state, dict):
        raise InvalidPickleError(f"{class_name}: its state is a {type(state).__name__}, not a dict")
    state = dict(state)
    args, kwargs = state.pop("_init_args", None), state.pop("_init_kwargs", None)
    args = () if args is None else tuple(args) if isinstance(args, list) else args
    kwargs = {} if kwargs is None else kwargs
    digest = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return PersistentRecord("", class_name, args, kwargs, state, digest)


_ATOMS = (Tensor, torch.Size, str, bytes, int, float, type(None), np.generic, np.dtype, torch.device, torch.dtype)


def _finish(value: Any, seen: dict[int, Any]) -> Any:
    """Turn torch stand-ins into records (in place where possible) and check every record, once each."""
    if isinstance(value, _ATOMS):
        return value
    if id(value) in seen:
        return seen[id(value)]
    seen[id(value)] = value
    if isinstance(value, TorchObject):
        state = value.__dict__.get("_pickled_state")
        module, name = value.qualname
        if not isinstance(state, dict):
            raise InvalidPickleError(f"{module}.{name}: its state is a {type(state).__name__}, not a dict")
        seen[id(value)] = value = PersistentRecord(module, name, (), {}, state)
    if isinstance(value, PersistentRecord):
        if isinstance(value.state, dict) and isinstance(value.init_kwargs, dict):
            _finish(value.state, seen)
            _finish(value.init_kwargs, seen)
        args = _finish(value.init_args, seen)
        if args is not value.init_args:
            object.__setattr__(value, "init_args", args)  # a stand-in inside the arguments became a record
        _check_record(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            value[key] = _finish(item, seen)
    elif isinstance(value, list):
        value[:] = [_finish(item, seen) for item in value]
    elif isinstance(value, tuple):
        items = tuple(_finish(item, seen) for item in value)
        if any(a is not b for a, b in zip(items, value)):
            seen[id(value)] = value = items
    elif isinstance(value, (set, frozenset)):
        if not all(isinstance(item, _ATOMS) for item in value):
            raise InvalidPickleError("a set holding objects")
    else:
        raise InvalidPickleError(f"an object of type {type(value).__name__}")
    return value


def _check_record(rec: PersistentRecord) -> None:
    """Types of a record's fields and of its module slots (_parameters, _buffers, _modules)."""
    name = rec.class_name if isinstance(rec.class_name, str) and rec.class_name.isidentifier() else None
    if name is None:
        raise InvalidPickleError("a persistent object without a class_name")
    if not isinstance(rec.state, dict):
        raise InvalidPickleError(f"{name}: its state is a {type(rec.state).__name__}, not a dict")
    if not isinstance(rec.init_args, tuple) or not isinstance(rec.init_kwargs, dict):
        raise InvalidPickleError(f"{name}: its _init_args/_init_kwargs are not a tuple/dict")
    for slot, kind in (("_parameters", Tensor), ("_buffers", Tensor), ("_modules", PersistentRecord)):
        entries = rec.state.get(slot, {})
        if not isinstance(entries, dict):
            raise InvalidPickleError(f"{name}.{slot} is a {type(entries).__name__}, not a dict")
        for key, item in entries.items():
            if not isinstance(key, str) or not (item is None or isinstance(item, kind)):
                raise InvalidPickleError(f"{name}.{slot}[{key!r}] is a {type(item).__name__}, not a {kind.__name__}")
    skip = rec.state.get("_non_persistent_buffers_set", set())
    if not isinstance(skip, (set, frozenset)) or not all(isinstance(k, str) for k in skip):
        raise InvalidPickleError(f"{name}._non_persistent_buffers_set is not a set of names")


def _is_torch_zip(path: Path) -> bool:
    """Whether the ZIP ``path`` holds ``<name>/data.pkl``, as torch.save writes."""
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/data.pkl") for n in zf.namelist())


NUMPY_ARRAY_GLOBALS = ("_reconstruct", "ndarray")  # how pickle rebuilds a numpy array (numpy.core.multiarray)


def _unpickle(path: Path, max_elements_per_byte: float) -> Any:
    """Open ``path`` (diffscore.io's bounded reader: a regular file, never read past the size it had when opened) and
    run the restricted unpickler; every failure becomes one DiffscoreError line."""
    if not path.exists():
        raise DiffscoreError(f"EDM network pickle {path} does not exist; check the path")
    if not path.is_file():
        raise DiffscoreError(f"EDM network pickle {path} is not a file")
    with open_user_file(path, f"EDM network pickle {path}", max_bytes=None) as f:
        f.max_bytes = size = os.fstat(f.fileno()).st_size  # no read may ask for more than the file holds
        head = f.read(4)
        if not head:
            raise DiffscoreError(f"EDM network pickle {path} is empty (0 bytes); download or copy it again")
        if head[:2] == b"PK" and zipfile.is_zipfile(path):
            what = "a torch checkpoint (torch.save ZIP)" if _is_torch_zip(path) else "a ZIP archive"
            raise DiffscoreError(f"{path} looks like {what}, not an EDM network pickle (network-snapshot-*.pkl)")
        f.seek(0)
        try:
            return RestrictedUnpickler(f, max_elements_per_byte * size, {PERSISTENT_HOOK: _reconstruct}).load()
        except DiffscoreError:
            raise
        except Exception as e:  # garbage bytes make the unpickler raise almost anything
            raise DiffscoreError(_load_error(path, head, e, at_end=f.tell() >= size)) from None


def _load_error(path: Path, head: bytes, e: Exception, at_end: bool = False) -> str:
    """The one-line message for an exception raised while unpickling ``path`` (which starts with ``head``;
    ``at_end``: the unpickler had read the whole file when it failed)."""
    if isinstance(e, RefusedGlobalError) and str(e).split(".")[-1] in NUMPY_ARRAY_GLOBALS:
        return (
            f"{path}: refused to load the global {e}: the file holds numpy arrays, which EDM's networks never do but "
            "an NVlabs/edm2 latent model's encoder (StabilityVAEEncoder) does; diffscore's VAE support is for Stable "
            "Diffusion folders and does not load latent EDM2 models yet; nothing was run"
        )
    if isinstance(e, RefusedGlobalError):
        return f"{path}: refused to load the global {e} (not on the EDM network pickle allow-list); nothing was run"
    if isinstance(e, InvalidPickleError):
        return f"{path} is not a valid EDM network pickle (tampered or corrupt): it holds {e}"
    if isinstance(e, EOFError) or "truncated" in str(e) or (at_end and head[:1] == b"\x80"):
        return f"{path} is truncated (the pickle ends early); download or copy it again"
    kind = "a corrupt pickle" if head[:1] == b"\x80" else "not a pickle"
    return f"{path} is {kind} ({one_line(e)})"


def read_edm_pickle(path: str | Path, max_elements_per_byte: float = MAX_ELEMENTS_PER_BYTE) -> dict[str, Any]:
    """Read an NVlabs/edm network pickle without running its code.

    Returns the pickled dict (``ema``, and usually ``loss_fn``, ``augment_pipe``, ``dataset_kwargs``) with every
    EDM/torch object as a :class:`PersistentRecord`; a file holding a bare network gives ``{"ema": record}``.
    Raises DiffscoreError (one line naming the file) for a missing, empty, truncated, foreign or tampered file, for
    non-finite weights in ``ema`` (naming the first), and for one whose tensors declare more than
    ``max_elements_per_byte`` elements per byte of the file (unpickler.py's docstring; raise it only for a trusted
    file whose tensors share storages).
    """
    path = Path(path)
    if not max_elements_per_byte > 0:
        raise DiffscoreError(f"max_elements_per_byte must be > 0, got {max_elements_per_byte}")
    obj = _unpickle(path, max_elements_per_byte)
    if type(obj) is int and obj == TORCH_MAGIC:
        raise DiffscoreError(f"{path} looks like a torch checkpoint (legacy torch.save), not an EDM network pickle")
    try:
        obj = _finish(obj, {})
    except (InvalidPickleError, RecursionError) as e:
        raise DiffscoreError(_load_error(path, b"\x80", e)) from None
    data = {"ema": obj} if isinstance(obj, PersistentRecord) else obj
    if not isinstance(data, dict) or "ema" not in data:
        what = f"a dict with keys {sorted(map(str, data))}" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise DiffscoreError(f"{path} holds {what}, not an EDM network pickle (a dict with 'ema')")
    ema = data["ema"]
    if not isinstance(ema, PersistentRecord) or not ema.source_sha256:
        what = f"{ema.module_name}.{ema.class_name}" if isinstance(ema, PersistentRecord) else type(ema).__name__
        raise DiffscoreError(f"{path}: 'ema' is a {what}, not an EDM network (a torch_utils.persistence class)")
    check_finite_weights(record_state_dict(ema), path)  # NaN/Inf weights would give NaN samples with exit 0
    return data


def _tensors(record: PersistentRecord, prefix: str = ""):
    """(key, tensor, is_parameter) in ``nn.Module.state_dict`` order: own parameters, buffers, then children."""
    for name, tensor in record.state.get("_parameters", {}).items():
        if tensor is not None:
            yield prefix + name, tensor, True
    skip = record.state.get("_non_persistent_buffers_set", set())
    for name, tensor in record.state.get("_buffers", {}).items():
        if tensor is not None and name not in skip:
            yield prefix + name, tensor, False
    for name, child in record.state.get("_modules", {}).items():
        if child is not None:
            yield from _tensors(child, f"{prefix}{name}.")


def record_state_dict(record: PersistentRecord) -> dict[str, Tensor]:
    """The ``state_dict()`` that EDM's own module would give: parameters and persistent buffers, detached."""
    if not isinstance(record, PersistentRecord):
        raise DiffscoreError(f"record_state_dict needs a PersistentRecord, got {type(record).__name__}")
    return {key: tensor.detach() for key, tensor, _ in _tensors(record)}


def _short(value: Any) -> str | None:
    """A short text for a scalar (or a short list of scalars); None for anything else."""
    if isinstance(value, (bool, str)) or value is None:
        return repr(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    if isinstance(value, (list, tuple)) and len(value) <= 8:
        items = [_short(v) for v in value]
        return None if None in items else f"[{', '.join(items)}]"  # type: ignore[arg-type]
    return None


def describe(record: PersistentRecord) -> str:
    """One line for messages: ``EDMPrecond(img_resolution=32, ..., model_type='SongUNet'), 55,734,531 parameters``."""
    fields = record.init_kwargs or {k: v for k, v in record.state.items() if not k.startswith("_") and k != "training"}
    shown = [f"{k}={text}" for k, v in fields.items() if (text := _short(v)) is not None]
    text = ", ".join(shown)
    text = text if len(text) <= 300 else text[:297] + "..."
    count = sum(t.numel() for _, t, is_param in _tensors(record) if is_param)
    return f"{record.class_name}({text}), {count:,} parameters"
