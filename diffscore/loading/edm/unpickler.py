"""The restricted unpickler behind diffscore's reader of NVlabs/edm network pickles (pickle.py beside it).

What ``find_class`` resolves (``ALLOWED`` and the hooks a caller adds, e.g. EDM's persistent-object hook; anything
else is refused, naming ``module.name``, before it is called):

- ``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter(_with_state)``, ``torch.storage._load_from_bytes`` -> our
  own rebuilders: storage bytes go through ``torch.load(weights_only=True, map_location='cpu')``, and a tensor's
  size/stride/offset is checked against its storage (torch's ``set_`` does not check); a tensor must sit on a
  storage this reader built, a Parameter on a tensor it built.
- ``torch.nn.modules.*`` classes (already imported by torch) -> a stand-in that only collects the pickled state
  (:class:`TorchObject`); the torch class is never called.
- Value types: ``collections.OrderedDict``, ``torch.device``, ``torch.Size``, ``torch.<dtype>``, ``numpy.dtype``,
  numpy scalars (rebuilt by :func:`_np_scalar`, no object dtype), ``dnnlib.util.EasyDict`` (read as ``dict``), and
  for protocols 2/3 ``builtins.set``/``frozenset`` (also as ``__builtin__``) and ``_codecs.encode`` (latin-1 only).

BUILD (``__setstate__`` after construction) is allowed only on the ``torch.nn`` stand-ins and ``numpy.dtype`` (how
both are pickled). On a tensor it would run ``Tensor.__setstate__`` -> ``set_(storage, offset, size, stride)``
unchecked: a 1-element storage re-pointed at a large size grows into leftover process memory. Python's pure-Python
unpickler is used because the C one offers no hook on BUILD.

The declared network must be backed by the file's bytes: no tensor holds more elements than its storage (a stride-0
view of one element can declare gigabytes), and all tensors together hold at most ``max_elements`` (the caller's
limit relative to the file size). Every element takes at least one byte (uint8/bool 1, fp16 2, fp32 4) where each
tensor is stored once, as EDM's snapshots are: one element per byte of the file is the default limit; a file of
views that share storages legitimately passes with the limit raised.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import sys
from typing import Any

import numpy as np
import torch
from torch import Tensor


class RefusedGlobalError(Exception):
    """A global that is not on the allow-list (``module.name``)."""


class InvalidPickleError(Exception):
    """The file unpickles into something an EDM network pickle cannot hold (the reason)."""


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _load_storage(data: Any) -> torch.TypedStorage:
    """``torch.storage._load_from_bytes``: the storage's legacy torch.save bytes, read with weights_only."""
    if not isinstance(data, bytes):
        raise InvalidPickleError(f"a tensor storage given as {type(data).__name__}, not bytes")
    try:
        storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # torch.load raises many types on bad bytes
        raise InvalidPickleError(
            f"a tensor storage that torch.load(weights_only=True) refuses ({one_line(e)})"
        ) from None
    if not isinstance(storage, torch.TypedStorage):
        raise InvalidPickleError(f"a tensor storage that holds a {type(storage).__name__}")
    if storage._untyped_storage.nbytes() > len(data):
        raise InvalidPickleError(f"a tensor storage of {storage._untyped_storage.nbytes():,} bytes in {len(data):,}")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None) -> Tensor:
    """``torch._utils._rebuild_tensor_v2``, with the size/stride/offset checked against the storage: every element
    it addresses lies inside, and it has no more elements than the storage (no stride-0 view declaring more)."""
    if not isinstance(storage, torch.TypedStorage):
        raise InvalidPickleError(f"a tensor whose storage is a {type(storage).__name__}")
    ints = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
    if ints is None or len(size) != len(stride) or not all(type(i) is int and i >= 0 for i in ints):
        raise InvalidPickleError(f"a tensor with a bad layout (offset {offset!r}, size {size!r}, stride {stride!r})")
    tensor = torch.empty((0,), dtype=storage.dtype)
    have = storage._untyped_storage.nbytes() // tensor.element_size()
    numel = math.prod(size)
    need = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else 0
    if need > have:
        raise InvalidPickleError(
            f"a tensor of size {list(size)} that needs {need} elements but its storage holds {have}"
        )
    if numel > have:
        raise InvalidPickleError(
            f"a tensor of size {list(size)} ({numel:,} elements) on a storage of {have:,}: a view that repeats its "
            "storage (stride 0), which an EDM network never holds"
        )
    if not isinstance(requires_grad, bool) or not isinstance(hooks, dict):
        raise InvalidPickleError("a tensor with malformed requires_grad/hooks fields")
    tensor.set_(storage._untyped_storage, offset, size, stride)
    if metadata:  # conj/neg bits: {str: bool}
        if not isinstance(metadata, dict) or not all(isinstance(v, bool) for v in metadata.values()):
            raise InvalidPickleError(f"a tensor with malformed metadata {metadata!r}")
        torch._utils.set_tensor_metadata(tensor, metadata)
    return tensor.requires_grad_(requires_grad) if requires_grad and tensor.is_floating_point() else tensor


def _rebuild_parameter(data, requires_grad, hooks, state=None) -> torch.nn.Parameter:
    """``torch._utils._rebuild_parameter`` (and ``_with_state``; the Python state of a Parameter is dropped)."""
    if type(data) is not Tensor or not isinstance(requires_grad, bool):
        raise InvalidPickleError(f"a Parameter whose data is a {type(data).__name__}")
    return torch.nn.Parameter(data, requires_grad=requires_grad and data.is_floating_point())


def _np_scalar(dtype: Any, data: Any = None) -> np.generic:
    """``numpy._core.multiarray.scalar(dtype, bytes)`` for plain (non-object) dtypes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise InvalidPickleError(f"a numpy scalar of dtype {dtype!r} with {type(data).__name__} data")
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how protocols 2/3 write ``bytes``."""
    if not isinstance(text, str) or encoding != "latin1":
        raise InvalidPickleError(f"_codecs.encode of a {type(text).__name__} as {encoding!r}")
    return text.encode("latin1")


ALLOWED: dict[str, Any] = {
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


class TorchObject:
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
        _STANDINS[module, name] = type(name, (TorchObject,), {"qualname": (module, name)})
    return _STANDINS[module, name]


class RestrictedUnpickler(pickle._Unpickler):
    """Resolves only the allow-list above (everything else raises ``RefusedGlobalError``), builds tensors only on
    storages it built itself, counts the elements they declare, and allows BUILD only on the stand-ins and numpy
    dtypes. Python's pure-Python unpickler, because the C one offers no hook on BUILD."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, max_elements: float, extra: dict[str, Any] | None = None) -> None:
        super().__init__(file)
        self.max_elements = max_elements  # tensor elements the file may declare in all
        self.extra = dict(extra or {})  # more "module.name" -> callable (EDM's persistent-object hook)
        self.elements = 0
        self.built: dict[int, object] = {}  # id -> storage or tensor this reader made (kept alive: ids stay unique)

    def _own(self, obj: Any) -> Any:
        self.built[id(obj)] = obj
        return obj

    def _storage(self, data: Any) -> torch.TypedStorage:
        return self._own(_load_storage(data))

    def _tensor(self, storage, offset, size, stride, *rest) -> Tensor:
        if self.built.get(id(storage)) is not storage:
            raise InvalidPickleError(f"a tensor on a {type(storage).__name__} that this file did not store as bytes")
        tensor = _rebuild_tensor(storage, offset, size, stride, *rest)
        self.elements += tensor.numel()
        if self.elements > self.max_elements:
            raise InvalidPickleError(
                f"tensors of more than {int(self.max_elements):,} elements in all, more than the file has bytes "
                "(views repeating a storage); if the file is trusted, raise max_elements_per_byte"
            )
        return self._own(tensor)

    def _parameter(self, data, *rest) -> torch.nn.Parameter:
        if self.built.get(id(data)) is not data:
            raise InvalidPickleError(f"a Parameter on a {type(data).__name__} that this file did not build as a tensor")
        return _rebuild_parameter(data, *rest)

    def find_class(self, module: str, name: str) -> Any:
        own = {
            "torch.storage._load_from_bytes": self._storage,
            "torch._utils._rebuild_tensor_v2": self._tensor,
            "torch._utils._rebuild_parameter": self._parameter,
            "torch._utils._rebuild_parameter_with_state": self._parameter,
        }
        key = f"{module}.{name}"
        found = own.get(key) or self.extra.get(key) or ALLOWED.get(key)
        if found is None and module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            found = vars(torch)[name]
        if found is None and module.startswith("torch.nn.modules."):
            found = _torch_standin(module, name)
        if found is None:
            raise RefusedGlobalError(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise InvalidPickleError("a persistent id (as torch.save writes), which an EDM network pickle never holds")

    def load_build(self) -> None:
        """BUILD: ``stack[-2].__setstate__(stack[-1])``, only for the torch.nn stand-ins and numpy dtypes."""
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(target, (TorchObject, np.dtype)):
            raise InvalidPickleError(
                f"state set on a {type(target).__name__} after it was built (BUILD), as a tampered tensor does"
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build
