"""diffscore/loading/edm/pickle.py: EDM-format pickles written here (no EDM installed), read without running them.

The stand-in classes below mirror the attribute layout of NVlabs/edm's training/networks.py; ``EDMPickler`` pickles
them exactly as ``torch_utils.persistence`` does: ``_reconstruct_persistent_obj(dict(type='class', version=6,
module_src=..., class_name=..., state=obj.__dict__))``, with ``_init_args``/``_init_kwargs`` in the state.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import random
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffscore.errors import DiffscoreError
from diffscore.loading.edm.pickle import PersistentRecord, describe, read_edm_pickle, record_state_dict
from tests.edm_files import EDM_SRC, EDMPickler, dump_edm, edm_class, fake_persistence


@edm_class
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.randn(out_features)) if bias else None


@edm_class
class Conv2d(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel, down=False):
        super().__init__()
        self.in_channels, self.out_channels, self.down = in_channels, out_channels, down
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = torch.nn.Parameter(torch.randn(out_channels))
        f = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("resample_filter", (f.ger(f) / 64)[None, None] if down else None)


@edm_class
class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)
        self.register_buffer("view", torch.arange(12.0).reshape(3, 4).t()[1:])  # offset and strides
        self.register_buffer("cache", torch.zeros(3), persistent=False)


@edm_class
class SongUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, model_channels=4, embedding_type=""):
        super().__init__()
        self.label_dropout = 0
        self.skip_scale = np.sqrt(0.5)  # a numpy scalar, as EDM's block_kwargs hold
        self.map_noise = FourierEmbedding(num_channels=model_channels)
        self.map_label = Linear(in_features=label_dim, out_features=model_channels) if label_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=2 * model_channels).half()
        self.enc = torch.nn.ModuleDict()
        self.enc["8x8_conv"] = Conv2d(in_channels=in_channels, out_channels=model_channels, kernel=3)
        self.enc["4x4_aux_residual"] = Conv2d(in_channels=in_channels, out_channels=model_channels, kernel=3, down=True)
        self.dec = torch.nn.ModuleDict({"8x8_aux_conv": Conv2d(model_channels, out_channels, kernel=1)})


@edm_class
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, sigma_max=float("inf"), **model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = False, 0, sigma_max, 0.5
        self.model = SongUNet(img_resolution, img_channels, img_channels, label_dim=label_dim, **model_kwargs)


@edm_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data


NET_KWARGS = dict(img_resolution=8, img_channels=3, label_dim=10, model_channels=4, embedding_type="fourier")
DATASET_KWARGS = dict(class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip", use_labels=True)


def small_net() -> EDMPrecond:
    torch.manual_seed(0)
    return EDMPrecond(**NET_KWARGS).eval().requires_grad_(False)


def snapshot(net) -> dict:
    """What EDM's training loop pickles."""
    return dict(ema=net, loss_fn=EDMLoss(sigma_data=0.5), augment_pipe=None, dataset_kwargs=dict(DATASET_KWARGS))


def one_line_error(path: Path, pattern: str) -> str:
    """read_edm_pickle(path) raises one DiffscoreError line that names the file and matches ``pattern``."""
    with pytest.raises(DiffscoreError) as info:
        read_edm_pickle(path)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and str(path) in message, message
    assert re.search(pattern, message), message
    return message


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_snapshot_reads_back_as_records_with_exact_tensors(tmp_path, protocol):
    net = small_net()
    data = read_edm_pickle(dump_edm(tmp_path / "network-snapshot-000000.pkl", snapshot(net), protocol))
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"} and "torch_utils" not in sys.modules
    ema = data["ema"]
    assert isinstance(ema, PersistentRecord) and (ema.module_name, ema.class_name) == ("", "EDMPrecond")
    assert ema.init_args == () and ema.init_kwargs == NET_KWARGS and "_init_kwargs" not in ema.state
    assert ema.source_sha256 == hashlib.sha256(EDM_SRC.encode()).hexdigest()[:16]
    assert ema.state["sigma_max"] == float("inf") and ema.state["training"] is False
    unet = ema.state["_modules"]["model"]
    assert unet.class_name == "SongUNet" and unet.init_kwargs["model_channels"] == 4
    assert type(unet.state["skip_scale"]) is np.float64 and unet.state["skip_scale"] == np.sqrt(0.5)
    enc = unet.state["_modules"]["enc"]
    assert (enc.module_name, enc.class_name, enc.source_sha256) == ("torch.nn.modules.container", "ModuleDict", "")
    down = enc.state["_modules"]["4x4_aux_residual"]
    assert down.class_name == "Conv2d" and down.init_kwargs == dict(in_channels=3, out_channels=4, kernel=3, down=True)

    got, expected = record_state_dict(ema), net.state_dict()
    assert list(got) == list(expected) and "model.map_noise.cache" not in got
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    assert (
        got["model.map_layer0.weight"].dtype == torch.float16
        and got["model.enc.8x8_conv.weight"].dtype == torch.float32
    )
    assert got["model.map_noise.view"].stride() == expected["model.map_noise.view"].stride()

    loss = data["loss_fn"]
    assert loss.class_name == "EDMLoss" and loss.init_kwargs == {"sigma_data": 0.5} and loss.state["P_mean"] == -1.2
    assert data["augment_pipe"] is None and data["dataset_kwargs"] == DATASET_KWARGS
    n_params = sum(p.numel() for p in net.parameters())
    assert describe(ema).startswith("EDMPrecond(img_resolution=8, img_channels=3, label_dim=10, model_channels=4")
    assert describe(ema).endswith(f", {n_params:,} parameters") and repr(ema) == f"PersistentRecord({describe(ema)})"
    with pytest.raises(DiffscoreError, match="needs a PersistentRecord"):
        record_state_dict(data["dataset_kwargs"])


def test_bare_network_reads_as_ema(tmp_path):
    data = read_edm_pickle(dump_edm(tmp_path / "net.pkl", small_net()))
    assert list(data) == ["ema"] and data["ema"].class_name == "EDMPrecond"


def test_embedded_module_source_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = dump_edm(tmp_path / "evil.pkl", snapshot(small_net()), module_src=f"open({str(marker)!r}, 'w').close()\n")
    assert read_edm_pickle(path)["ema"].class_name == "EDMPrecond" and not marker.exists()

    def exec_like_edm(meta):  # what torch_utils.persistence does with module_src
        exec(meta["module_src"], {})
        return meta["class_name"]

    with fake_persistence(exec_like_edm):
        pickle.loads(path.read_bytes())
    assert marker.exists()  # the payload is live: plain pickle.load runs it


def call_global(module: str, name: str, args: str) -> bytes:
    """A protocol-0 pickle that calls ``module.name`` on ``args`` (pickle opcodes), the classic exploit."""
    return f"c{module}\n{name}\n({args}tR.".encode()


@pytest.mark.parametrize(
    "module,name,args",
    [
        ("os", "system", "Vtouch {marker}\n"),
        ("builtins", "eval", "Vopen({marker!r}, 'w').close()\n"),
        ("subprocess", "Popen", "(Vtouch\nV{marker}\nl"),
    ],
)
def test_dangerous_globals_are_refused_and_nothing_runs(tmp_path, module, name, args):
    marker = tmp_path / "ran"
    path = tmp_path / "exploit.pkl"
    path.write_bytes(call_global(module, name, args.format(marker=str(marker))))
    one_line_error(path, re.escape(f"refused to load the global {module}.{name} "))
    assert not marker.exists()
    result = pickle.loads(path.read_bytes())  # the same bytes through plain pickle do run
    if name == "Popen":
        result.wait()
    assert marker.exists()


def test_refused_global_deep_inside_a_snapshot_and_unknown_modules_are_not_imported(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    data = snapshot(small_net())
    data["dataset_kwargs"]["path"] = Payload()
    one_line_error(dump_edm(tmp_path / "nested.pkl", data), re.escape(f"{os.system.__module__}.system"))
    assert not marker.exists()
    already = "this" in sys.modules
    (tmp_path / "zen.pkl").write_bytes(b"cthis\ns\n.")
    one_line_error(tmp_path / "zen.pkl", re.escape("refused to load the global this.s"))
    assert already or "this" not in sys.modules


def write_half_snapshot(path: Path) -> None:
    buf = io.BytesIO()
    with fake_persistence():
        EDMPickler(buf, pickle.DEFAULT_PROTOCOL).dump(snapshot(small_net()))
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


BROKEN = {  # kind: (write the file at path, the pattern its one-line error matches)
    "missing": (lambda path: None, "does not exist"),
    "directory": (lambda path: path.mkdir(), "is not a file"),
    "empty": (lambda path: path.write_bytes(b""), "is empty"),
    "truncated": (write_half_snapshot, "is truncated"),
    "random": (lambda path: path.write_bytes(b"\x07" + random.Random(0).randbytes(3000)), "is not a pickle"),
    "json": (lambda path: path.write_text(json.dumps({"ema": [1, 2]})), "is not a pickle"),
    "torch_zip": (lambda path: torch.save({"w": torch.ones(2)}, path), r"like a torch checkpoint \(torch.save ZIP\)"),
    "torch_legacy": (
        lambda path: torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False),
        r"like a torch checkpoint \(legacy torch.save\)",
    ),
    "zip": (lambda path: zipfile.ZipFile(path, "w").close(), "looks like a ZIP archive"),
    "other_dict": (lambda path: path.write_bytes(pickle.dumps({"weights": [1.0]})), r"dict with keys \['weights'\]"),
    "list": (lambda path: path.write_bytes(pickle.dumps([1, 2])), "holds a list, not an EDM network pickle"),
    "counter": (
        lambda path: path.write_bytes(pickle.dumps(collections.Counter(a=1))),
        "refused to load the global collections.Counter",
    ),
    "torch_module": (
        lambda path: path.write_bytes(pickle.dumps(torch.nn.Linear(2, 2))),
        "'ema' is a torch.nn.modules.linear.Linear, not an EDM network",
    ),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_and_foreign_files_give_one_clear_line(tmp_path, kind):
    write, pattern = BROKEN[kind]
    path = tmp_path / "network.pkl"
    write(path)
    one_line_error(path, pattern)


class ShortTensor:
    """A tensor of 100 elements on a storage of 2 (``set_`` alone would read past the end)."""

    def __init__(self, offset=0):
        self.offset = offset

    def __reduce__(self):
        storage = torch.ones(2)._typed_storage()
        return torch._utils._rebuild_tensor_v2, (storage, self.offset, (100,), (1,), False, collections.OrderedDict())


class GarbageStorage:
    def __reduce__(self):
        return torch.storage._load_from_bytes, (b"not a torch.save",)


def conv_tamper(edit):
    """Apply ``edit(meta)`` to every Conv2d's meta; returns the tamper hook."""

    def tamper(meta):
        if meta["class_name"] == "Conv2d":
            edit(meta)
        return meta

    return tamper


def with_buffer(value):
    return lambda meta: meta["state"].update(_buffers={**meta["state"]["_buffers"], "resample_filter": value})


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda meta: meta.update(state=[1, 2]), "Conv2d: its state is a list, not a dict"),
        (lambda meta: meta.pop("class_name"), "a persistent object without a class_name"),
        (lambda meta: meta.update(type="function"), r"meta is not a dict\(type='class'"),
        (with_buffer(ShortTensor()), r"size \[100\] that needs 100 elements but its storage holds 2"),
        (with_buffer(ShortTensor(offset=-1)), "a tensor with a bad layout"),
        (with_buffer(GarbageStorage()), r"torch.load\(weights_only=True\) refuses"),
        (with_buffer("abc"), r"Conv2d._buffers\['resample_filter'\] is a str, not a Tensor"),
        (lambda meta: meta["state"].update(_modules=[]), "Conv2d._modules is a list, not a dict"),
    ],
)
def test_tampered_records_are_refused(tmp_path, edit, pattern):
    path = dump_edm(tmp_path / "tampered.pkl", snapshot(small_net()), tamper=conv_tamper(edit))
    message = one_line_error(path, pattern)
    assert message.startswith(f"{path} is not a valid EDM network pickle (tampered or corrupt)")


# ---------------------------------------------------------------------------------------------------------
# Issue 34: a tensor grown by BUILD after the check, and networks declared far larger than the file.


class GrownAfterTheCheck:
    """A tensor rebuilt (and checked) on a 1-element storage, then BUILD with (storage, 0, (4096,), (1,)):
    ``Tensor.__setstate__`` calls ``set_`` unchecked, which grows the storage: 4,095 elements of leftover memory.
    ``parameter`` wraps it in a Parameter first (BUILD then lands on the Parameter)."""

    def __init__(self, parameter: bool = False):
        self.parameter = parameter

    def __reduce__(self):
        storage = torch.ones(1)._typed_storage()
        grow = (storage, 0, (4096,), (1,))
        if self.parameter:
            return torch._utils._rebuild_parameter, (torch.ones(1), False, collections.OrderedDict()), grow
        return torch._utils._rebuild_tensor_v2, (storage, 0, (1,), (1,), False, collections.OrderedDict()), grow


class Repeated:
    """A view of ``shape`` with ``stride`` at element 0 of ``storage``, pickled as torch pickles a view."""

    def __init__(self, shape, stride, storage):
        self.shape, self.stride, self.storage = shape, stride, storage

    def __reduce__(self):
        args = (self.storage, 0, self.shape, self.stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


@pytest.mark.parametrize("parameter", [False, True])
def test_a_tensor_grown_by_build_after_its_check_is_refused(tmp_path, parameter):
    path = dump_edm(
        tmp_path / "grown.pkl", snapshot(small_net()), tamper=conv_tamper(with_buffer(GrownAfterTheCheck(parameter)))
    )
    what = "Parameter" if parameter else "Tensor"
    message = one_line_error(path, rf"it holds state set on a {what} after it was built \(BUILD\)")
    assert message.startswith(f"{path} is not a valid EDM network pickle (tampered or corrupt)")
    with fake_persistence(lambda meta: meta):  # what the same bytes do through torch's own rebuilders
        grown = pickle.loads(path.read_bytes())
    buf = next(m["state"]["_buffers"]["resample_filter"] for m in _metas(grown) if m["class_name"] == "Conv2d")
    # set_ grew the 4-byte storage to 16 KB: 4,095 elements the file never held (uninitialised process memory)
    assert buf.numel() == 4096 and buf.untyped_storage().nbytes() == 16384 and float(buf[0]) == 1.0


def _metas(value):
    """Every persistent meta dict in what a fake persistence returned (meta -> meta)."""
    if isinstance(value, dict):
        if value.get("type") == "class":
            yield value
        for item in value.values():
            yield from _metas(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _metas(item)
    elif isinstance(value, torch.nn.Module):  # the ModuleDicts, rebuilt by plain pickle
        yield from _metas(dict(value._modules))


def stride0_network(path: Path, layers: int, channels: int = 1024) -> Path:
    """An EDM snapshot whose ``layers`` weights [channels, channels, 3, 3] are stride-0 views of one element each:
    the file stays kilobytes while the network it declares is layers * channels^2 * 36 bytes (56 layers: 2.1 GB)."""
    net = small_net()
    for i in range(layers):
        net.model.enc.add_module(f"big{i}", Linear(1, 1, bias=False))

    def tamper(meta):
        if meta["class_name"] == "Linear" and meta["state"].get("in_features") == 1:
            shape = (channels, channels, 3, 3)
            meta["state"]["_parameters"]["weight"] = Repeated(shape, (0, 0, 0, 0), torch.zeros(1)._typed_storage())
        return meta

    return dump_edm(path, snapshot(net), tamper=tamper)


def test_a_network_of_stride0_views_declaring_gigabytes_is_refused_and_allocates_nothing(tmp_path):
    import subprocess

    path = stride0_network(tmp_path / "huge.pkl", layers=56)
    assert path.stat().st_size < 64_000  # 56 weights of 37.7 MB: 2.1 GB declared
    one_line_error(path, r"a tensor of size \[1024, 1024, 3, 3\] \(9,437,184 elements\) on a storage of 1: a view")
    code = (  # what convert does with the weights: materialise them; peak memory of the whole process (VmHWM: the
        # child's own; ru_maxrss would report the pytest parent's peak, which a fork + exec carries over on Linux)
        "import resource, sys\n"
        "from diffscore.loading.edm.pickle import read_edm_pickle, record_state_dict\n"
        "from diffscore.errors import DiffscoreError\n"
        "try:\n"
        "    kept = [t.clone() for t in record_state_dict(read_edm_pickle(sys.argv[1])['ema']).values()]\n"
        "except DiffscoreError as e:\n"
        "    print(e)\n"
        "try:\n"
        "    hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "    print(int(hwm.split()[1]) // 1024)\n"
        "except (OSError, StopIteration):\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    child = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    report = (child.returncode, child.stdout[-600:], child.stderr[-600:])
    *lines, peak_mib = child.stdout.strip().splitlines() or ["", "0"]
    assert child.returncode == 0 and len(lines) == 1 and "a view that repeats its storage" in lines[0], report
    assert int(peak_mib) < 1024, report  # torch and numpy themselves: ~400 MiB; the declared network: 2,100 MiB


def test_views_sharing_one_storage_are_limited_by_the_file_size_unless_the_caller_raises_it(tmp_path):
    storage = torch.zeros(1000)._typed_storage()  # 4 KB, viewed whole by every weight below
    net = small_net()
    for i in range(40):
        net.model.enc.add_module(f"shared{i}", Linear(1, 1, bias=False))

    def tamper(meta):
        if meta["class_name"] == "Linear" and meta["state"].get("in_features") == 1:
            meta["state"]["_parameters"]["weight"] = Repeated((10, 100), (100, 1), storage)
        return meta

    path = dump_edm(tmp_path / "shared.pkl", snapshot(net), tamper=tamper)
    size = path.stat().st_size
    assert 40 * 1000 > size  # 40,000 elements declared on ~4 KB of storage
    one_line_error(path, rf"tensors of more than {size:,} elements in all, more than the file has bytes")
    data = read_edm_pickle(path, max_elements_per_byte=100)  # a trusted file: the caller raises the limit
    weights = [t for k, t in record_state_dict(data["ema"]).items() if "shared" in k]
    assert len(weights) == 40 and all(
        w.untyped_storage().data_ptr() == weights[0].untyped_storage().data_ptr() for w in weights
    )
    with pytest.raises(DiffscoreError, match="max_elements_per_byte must be > 0"):
        read_edm_pickle(path, max_elements_per_byte=0)
    ordinary = dump_edm(tmp_path / "ordinary.pkl", snapshot(small_net()))  # each tensor stored once
    n = sum(t.numel() for t in record_state_dict(read_edm_pickle(ordinary)["ema"]).values())
    assert n < ordinary.stat().st_size / 4 + 1000  # fp32: a quarter element per byte, far below the default 1


def test_non_finite_weights_are_refused_naming_the_first(tmp_path):
    net = small_net()
    with torch.no_grad():
        net.model.enc["8x8_conv"].weight[0, 0, 1, 1] = float("inf")
        net.model.dec["8x8_aux_conv"].bias[0] = float("nan")
    message = one_line_error(dump_edm(tmp_path / "nan.pkl", snapshot(net)), "holds 1 non-finite value")
    assert message == (
        f"{tmp_path / 'nan.pkl'}: weight model.enc.8x8_conv.weight holds 1 non-finite value (NaN/Inf) of 108; the "
        "file is damaged or comes from a diverged run: use an earlier checkpoint"
    )
