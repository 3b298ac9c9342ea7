"""NVlabs/edm2-format network pickles written by the tests, without EDM2 installed.

EDM2's training loop (training/training_loop.py) writes ``pickle.dump(EasyDict(encoder=..., dataset_kwargs=...,
loss_fn=..., ema=net.cpu().eval().requires_grad_(False).to(torch.float16)), f)``; every class of
training/networks_edm2.py (Precond, UNet, Block, MPConv, MPFourier), training/encoders.py (StandardRGBEncoder,
StabilityVAEEncoder) and EDM2Loss is a ``torch_utils.persistence`` class, pickled as tests/edm_files.py describes;
``enc``/``dec`` are plain ``torch.nn.ModuleDict``\\ s and the outer dict a ``dnnlib.util.EasyDict``.
``write_edm2_network`` builds that tree from an EDM2-named state dict (``unet.enc.16x16_conv.weight``, ...), naming
each record as EDM2's class at that place, MPFourier's tensors as buffers, everything else as parameters.
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import numpy as np
import torch

from tests.edm_files import dump_edm, edm_class

EDM2_SRC = "# the source of training/networks_edm2.py would be here\nimport torch\n"


def _persistent(name: str, base: type = torch.nn.Module) -> type:
    """An ``edm_class`` stand-in named like EDM2's class, taking any arguments."""

    def init(self, *args, **kwargs) -> None:
        base.__init__(self)

    return edm_class(type(name, (base,), {"__init__": init}))


CLASSES = {name: _persistent(name) for name in ("Precond", "UNet", "Block", "MPConv", "MPFourier")}
PLAIN = {name: _persistent(name, object) for name in ("StandardRGBEncoder", "StabilityVAEEncoder", "EDM2Loss")}


def _class_at(path: str) -> type:
    """EDM2's class of the module at ``path`` (dotted, from Precond)."""
    *parents, name = path.split(".")
    if path == "unet":
        return CLASSES["UNet"]
    if path in ("unet.enc", "unet.dec"):
        return torch.nn.ModuleDict
    if name in ("emb_fourier", "logvar_fourier"):
        return CLASSES["MPFourier"]
    if parents in (["unet", "enc"], ["unet", "dec"]) and not name.endswith("_conv"):
        return CLASSES["Block"]
    return CLASSES["MPConv"]


def module_tree(state: dict[str, torch.Tensor], class_at=_class_at) -> torch.nn.Module:
    """EDM2's Precond module tree whose state_dict() is ``state`` (same keys), records named by ``class_at``."""
    root = CLASSES["Precond"]()
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        node = root
        for depth, part in enumerate(path):
            if part not in node._modules:
                cls = class_at(".".join(path[: depth + 1]))
                if cls is CLASSES["MPConv"] and depth == len(path) - 1 and tensor.ndim in (2, 4):
                    child = cls(tensor.shape[1], tensor.shape[0], kernel=list(tensor.shape[2:]))  # EDM2's call
                else:
                    child = cls()
                node.add_module(part, child)
            node = node._modules[part]
        if leaf in ("freqs", "phases"):
            node.register_buffer(leaf, tensor.detach().clone())
        else:
            node.register_parameter(leaf, torch.nn.Parameter(tensor.detach().clone(), requires_grad=False))
    return root


@contextlib.contextmanager
def fake_dnnlib():
    """A ``dnnlib.util.EasyDict`` in sys.modules only while this block runs (what EDM2's file pickles by name)."""
    easy = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    pkg, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    util.EasyDict, pkg.util = easy, util
    sys.modules.update({"dnnlib": pkg, "dnnlib.util": util})
    try:
        yield easy
    finally:
        del sys.modules["dnnlib.util"], sys.modules["dnnlib"]


def encoder_record(kind: str = "StandardRGBEncoder", **kwargs):
    """EDM2's encoder object: StandardRGBEncoder() or StabilityVAEEncoder(**kwargs) with its computed state."""
    enc = PLAIN[kind](**kwargs)
    if kind == "StabilityVAEEncoder":  # EDM2's __init__: numpy float32 scale and bias, the VAE not pickled
        raw_mean, raw_std = (
            kwargs.get("raw_mean", [5.81, 3.25, 0.12, -2.15]),
            kwargs.get("raw_std", [4.17, 4.62, 3.71, 3.28]),
        )
        enc.vae_name = kwargs.get("vae_name", "stabilityai/sd-vae-ft-mse")
        enc.scale = np.float32(kwargs.get("final_std", 0.5)) / np.float32(raw_std)
        enc.bias = np.float32(kwargs.get("final_mean", 0)) - np.float32(raw_mean) * enc.scale
        enc.batch_size, enc._vae = 8, None
    return enc


def write_edm2_network(
    path: Path,
    precond_kwargs: dict,
    state: dict[str, torch.Tensor],
    encoder=None,
    class_at=_class_at,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """An EDM2 network pickle: ``ema`` = Precond(**precond_kwargs) with ``state`` (EDM2's keys) in ``dtype``."""
    net = module_tree(state, class_at)
    net._init_kwargs = dict(precond_kwargs)  # EDM2 builds Precond from keyword arguments only
    for key in ("img_resolution", "img_channels", "label_dim"):
        setattr(net, key, precond_kwargs.get(key))
    net.use_fp16, net.sigma_data = precond_kwargs.get("use_fp16", True), precond_kwargs.get("sigma_data", 0.5)
    net = net.eval().requires_grad_(False).to(dtype)
    loss = PLAIN["EDM2Loss"](P_mean=-0.8, P_std=1.6)
    loss.P_mean, loss.P_std, loss.sigma_data = -0.8, 1.6, 0.5
    dataset = dict(class_name="training.dataset.ImageFolderDataset", path="datasets/img64.zip", use_labels=True)
    with fake_dnnlib() as easy:
        enc = encoder if encoder is not None else encoder_record()
        data = easy(encoder=enc, dataset_kwargs=easy(dataset), loss_fn=loss, ema=net)
        return dump_edm(path, data, module_src=EDM2_SRC)
