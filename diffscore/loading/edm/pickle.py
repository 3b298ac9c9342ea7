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

What ``find_class`` resolves (``_ALLOWED``; anything else is refused, naming ``module.name``, before it is called):

- ``torch_utils.persistence._reconstruct_persistent_obj`` -> :func:`_reconstruct`: an inert
  :class:`PersistentRecord`; ``module_src`` is hashed, never executed.
- ``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter(_with_state)``, ``torch.storage._load_from_bytes`` -> our
  own rebuilders: storage bytes go through ``torch.load(weights_only=True, map_location='cpu')``, and a tensor's
  size/stride/offset is checked against its storage (torch's ``set_`` does not check).
- ``torch.nn.modules.*`` classes (already imported by torch) -> a stand-in that only collects the pickled state,
  turned into a :class:`PersistentRecord` (``source_sha256=''``); the torch class is never called.
- Value types: ``collections.OrderedDict``, ``torch.device``, ``torch.Size``, ``torch.<dtype>``, ``numpy.dtype``,
  numpy scalars (rebuilt by :func:`_np_scalar`, no object dtype), ``dnnlib.util.EasyDict`` (read as ``dict``), and
  for protocols 2/3 ``builtins.set``/``frozenset`` (also as ``__builtin__``) and ``_codecs.encode`` (latin-1 only).
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffscore.errors import DiffscoreError

TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of a legacy (non-zip) torch.save file


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


class _RefusedGlobalError(Exception):
    """A global that is not on the allow-list (``module.name``)."""


class _InvalidError(Exception):
    """The file unpickles into something an EDM network pickle cannot hold (the reason)."""


def _reconstruct(meta: Any) -> PersistentRecord:
    """Stands in for ``torch_utils.persistence._reconstruct_persistent_obj``: a record, no ``exec``."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise _InvalidError("a persistent object whose meta is not a dict(type='class', ...) as EDM writes")
    class_name, src, state = meta.get("class_name"), meta.get("module_src"), meta.get("state")
    if not isinstance(src, str):  # a missing/odd class_name is reported by _check_record
        raise _InvalidError(f"{class_name}: module_src is a {type(src).__name__}, not source text")
    if not isinstance(state, dict):
        raise _InvalidError(f"{class_name}: its state is a {type(state).__name__}, not a dict")
    state = dict(state)
    args, kwargs = state.pop("_init_args", None), state.pop("_init_kwargs", None)
    args = () if args is None else tuple(args) if isinstance(args, list) else args
    kwargs = {} if kwargs is None else kwargs
    digest = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return PersistentRecord("", class_name, args, kwargs, state, digest)


def _load_storage(data: Any) -> torch.TypedStorage:
    """``torch.storage._load_from_bytes``: the storage's legacy torch.save bytes, read with weights_only."""
    if not isinstance(data, bytes):
        raise _InvalidError(f"a tensor storage given as {type(data).__name__}, not bytes")
    try:
        storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # torch.load raises many types on bad bytes
        raise _InvalidError(f"a tensor storage that torch.load(weights_only=True) refuses ({_one_line(e)})") from None
    if not isinstance(storage, torch.TypedStorage):
        raise _InvalidError(f"a tensor storage that holds a {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None) -> Tensor:
    """``torch._utils._rebuild_tensor_v2``, with the size/stride/offset checked against the storage."""
    if not isinstance(storage, torch.TypedStorage):
        raise _InvalidError(f"a tensor whose storage is a {type(storage).__name__}")
    ints = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
    if ints is None or len(size) != len(stride) or not all(type(i) is int and i >= 0 for i in ints):
        raise _InvalidError(f"a tensor with a bad layout (offset {offset!r}, size {size!r}, stride {stride!r})")
    tensor = torch.empty((0,), dtype=storage.dtype)
    have = storage._untyped_storage.nbytes() // tensor.element_size()
    need = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if math.prod(size) else 0
    if need > have:
        raise _InvalidError(f"a tensor of size {list(size)} that needs {need} elements but its storage holds {have}")
    if not isinstance(requires_grad, bool) or not isinstance(hooks, dict):
        raise _InvalidError("a tensor with malformed requires_grad/hooks fields")
    tensor.set_(storage._untyped_storage, offset, size, stride)
    if metadata:  # conj/neg bits: {str: bool}
        if not isinstance(metadata, dict) or not all(isinstance(v, bool) for v in metadata.values()):
            raise _InvalidError(f"a tensor with malformed metadata {metadata!r}")
        torch._utils.set_tensor_metadata(tensor, metadata)
    return tensor.requires_grad_(requires_grad) if requires_grad and tensor.is_floating_point() else tensor


def _rebuild_parameter(data, requires_grad, hooks, state=None) -> torch.nn.Parameter:
    """``torch._utils._rebuild_parameter`` (and ``_with_state``; the Python state of a Parameter is dropped)."""
    if type(data) is not Tensor or not isinstance(requires_grad, bool):
        raise _InvalidError(f"a Parameter whose data is a {type(data).__name__}")
    return torch.nn.Parameter(data, requires_grad=requires_grad and data.is_floating_point())


def _np_scalar(dtype: Any, data: Any = None) -> np.generic:
    """``numpy._core.multiarray.scalar(dtype, bytes)`` for plain (non-object) dtypes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _InvalidError(f"a numpy scalar of dtype {dtype!r} with {type(data).__name__} data")
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how protocols 2/3 write ``bytes``."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _InvalidError(f"_codecs.encode of a {type(text).__name__} as {encoding!r}")
    return text.encode("latin1")


_ALLOWED: dict[str, Any] = {
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.storage._load_from_bytes": _load_storage,
    "collections.OrderedDict": collections.OrderedDict,
    "torch.device": torch.device,
    "torch.Size": torch.Size,
    "numpy.dtype": np.dtype,
    "numpy.core.multiarray.scalar": _np_scalar,
    "numpy._core.multiarray.scalar": _np_scalar,
    "dnnlib.util.EasyDict": dict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "__builtin__.set": set,  # protocols 2/3 write Python 2 names (fix_imports)
    "__builtin__.frozenset": frozenset,
    "_codecs.encode": _latin1,
}


class _TorchObject:
    """Collects the pickled state of a ``torch.nn`` object (NEWOBJ makes it, BUILD fills it); never a module."""

    qualname: tuple[str, str] = ("", "")

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_pickled_state"] = state


_STANDINS: dict[tuple[str, str], type] = {}


def _torch_standin(module: str, name: str) -> type | None:
    """A stand-in class for ``torch.nn.modules.<...>.<name>`` if that is an ``nn.Module`` class (no import)."""
    cls = vars(sys.modules[module]).get(name) if module in sys.modules and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        return None
    if (module, name) not in _STANDINS:
        _STANDINS[module, name] = type(name, (_TorchObject,), {"qualname": (module, name)})
    return _STANDINS[module, name]


class _EDMUnpickler(pickle.Unpickler):
    """Resolves only the allow-list above; everything else raises ``_RefusedGlobalError``."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get(f"{module}.{name}")
        if found is None and module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            found = vars(torch)[name]
        if found is None and module.startswith("torch.nn.modules."):
            found = _torch_standin(module, name)
        if found is None:
            raise _RefusedGlobalError(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _InvalidError("a persistent id (as torch.save writes), which an EDM network pickle never holds")


NUMPY_ARRAY_GLOBALS = ("_reconstruct", "ndarray")  # how pickle rebuilds a numpy array (numpy.core.multiarray)

_ATOMS = (Tensor, torch.Size, str, bytes, int, float, type(None), np.generic, np.dtype, torch.device, torch.dtype)


def _finish(value: Any, seen: dict[int, Any]) -> Any:
    """Turn torch stand-ins into records (in place where possible) and check every record, once each."""
    if isinstance(value, _ATOMS):
        return value
    if id(value) in seen:
        return seen[id(value)]
    seen[id(value)] = value
    if isinstance(value, _TorchObject):
        state = value.__dict__.get("_pickled_state")
        module, name = value.qualname
        if not isinstance(state, dict):
            raise _InvalidError(f"{module}.{name}: its state is a {type(state).__name__}, not a dict")
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
            raise _InvalidError("a set holding objects")
    else:
        raise _InvalidError(f"an object of type {type(value).__name__}")
    return value


def _check_record(rec: PersistentRecord) -> None:
    """Types of a record's fields and of its module slots (_parameters, _buffers, _modules)."""
    name = rec.class_name if isinstance(rec.class_name, str) and rec.class_name.isidentifier() else None
    if name is None:
        raise _InvalidError("a persistent object without a class_name")
    if not isinstance(rec.state, dict):
        raise _InvalidError(f"{name}: its state is a {type(rec.state).__name__}, not a dict")
    if not isinstance(rec.init_args, tuple) or not isinstance(rec.init_kwargs, dict):
        raise _InvalidError(f"{name}: its _init_args/_init_kwargs are not a tuple/dict")
    for slot, kind in (("_parameters", Tensor), ("_buffers", Tensor), ("_modules", PersistentRecord)):
        entries = rec.state.get(slot, {})
        if not isinstance(entries, dict):
            raise _InvalidError(f"{name}.{slot} is a {type(entries).__name__}, not a dict")
        for key, item in entries.items():
            if not isinstance(key, str) or not (item is None or isinstance(item, kind)):
                raise _InvalidError(f"{name}.{slot}[{key!r}] is a {type(item).__name__}, not a {kind.__name__}")
    skip = rec.state.get("_non_persistent_buffers_set", set())
    if not isinstance(skip, (set, frozenset)) or not all(isinstance(k, str) for k in skip):
        raise _InvalidError(f"{name}._non_persistent_buffers_set is not a set of names")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _is_torch_zip(path: Path) -> bool:
    """Whether the ZIP ``path`` holds ``<name>/data.pkl``, as torch.save writes."""
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/data.pkl") for n in zf.namelist())


def _unpickle(path: Path) -> Any:
    """Open ``path`` and run the restricted unpickler; every failure becomes one DiffscoreError line."""
    if not path.exists():
        raise DiffscoreError(f"EDM network pickle {path} does not exist; check the path")
    if not path.is_file():
        raise DiffscoreError(f"EDM network pickle {path} is not a file")
    with path.open("rb") as f:
        head = f.read(4)
        if not head:
            raise DiffscoreError(f"EDM network pickle {path} is empty (0 bytes); download or copy it again")
        if head[:2] == b"PK" and zipfile.is_zipfile(path):
            what = "a torch checkpoint (torch.save ZIP)" if _is_torch_zip(path) else "a ZIP archive"
            raise DiffscoreError(f"{path} looks like {what}, not an EDM network pickle (network-snapshot-*.pkl)")
        f.seek(0)
        try:
            return _EDMUnpickler(f).load()
        except Exception as e:  # garbage bytes make the unpickler raise almost anything
            raise DiffscoreError(_load_error(path, head, e)) from None


def _load_error(path: Path, head: bytes, e: Exception) -> str:
    """The one-line message for an exception raised while unpickling ``path`` (which starts with ``head``)."""
    if isinstance(e, _RefusedGlobalError) and str(e).split(".")[-1] in NUMPY_ARRAY_GLOBALS:
        return (
            f"{path}: refused to load the global {e}: the file holds numpy arrays, which EDM's networks never do but "
            "an NVlabs/edm2 latent model's encoder (StabilityVAEEncoder) does; latent EDM2 models need the VAE "
            "support that the Stable Diffusion work (issue 33) adds; nothing was run"
        )
    if isinstance(e, _RefusedGlobalError):
        return f"{path}: refused to load the global {e} (not on the EDM network pickle allow-list); nothing was run"
    if isinstance(e, _InvalidError):
        return f"{path} is not a valid EDM network pickle (tampered or corrupt): it holds {e}"
    if isinstance(e, EOFError) or "truncated" in str(e):
        return f"{path} is truncated (the pickle ends early); download or copy it again"
    kind = "a corrupt pickle" if head[:1] == b"\x80" else "not a pickle"
    return f"{path} is {kind} ({_one_line(e)})"


def read_edm_pickle(path: str | Path) -> dict[str, Any]:
    """Read an NVlabs/edm network pickle without running its code.

    Returns the pickled dict (``ema``, and usually ``loss_fn``, ``augment_pipe``, ``dataset_kwargs``) with every
    EDM/torch object as a :class:`PersistentRecord`; a file holding a bare network gives ``{"ema": record}``.
    Raises DiffscoreError (one line naming the file) for a missing, empty, truncated, foreign or tampered file.
    """
    path = Path(path)
    obj = _unpickle(path)
    if type(obj) is int and obj == TORCH_MAGIC:
        raise DiffscoreError(f"{path} looks like a torch checkpoint (legacy torch.save), not an EDM network pickle")
    try:
        obj = _finish(obj, {})
    except (_InvalidError, RecursionError) as e:
        raise DiffscoreError(_load_error(path, b"\x80", e)) from None
    data = {"ema": obj} if isinstance(obj, PersistentRecord) else obj
    if not isinstance(data, dict) or "ema" not in data:
        what = f"a dict with keys {sorted(map(str, data))}" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise DiffscoreError(f"{path} holds {what}, not an EDM network pickle (a dict with 'ema')")
    ema = data["ema"]
    if not isinstance(ema, PersistentRecord) or not ema.source_sha256:
        what = f"{ema.module_name}.{ema.class_name}" if isinstance(ema, PersistentRecord) else type(ema).__name__
        raise DiffscoreError(f"{path}: 'ema' is a {what}, not an EDM network (a torch_utils.persistence class)")
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
