"""Models larger than one device: where accelerate puts each part (``--device_map``, ``--max_memory``,
``--offload_folder``).

transformers loads a model through accelerate when ``device_map`` is given (``auto``, ``balanced``,
``balanced_low_0`` or ``sequential``): each module goes to a GPU, CPU memory or disk within ``max_memory`` per device,
and accelerate's hooks bring an offloaded module's weights in for its forward pass and move its inputs to where it
runs. headlab's capture, ablation and steering hooks sit on the attention output projections' inputs, so they see
the same values wherever each layer lives. Reading weights (the OV detectors) goes through
:func:`module_weights`, since an offloaded weight is a ``meta`` tensor outside the forward pass.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from headlab.errors import HeadlabError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Placement:
    """Where the model's parts go (all unset: the whole model on ``--device``).

    Args:
        device_map: accelerate's placement strategy: auto, balanced, balanced_low_0 or sequential.
        max_memory: memory per device as a JSON map, e.g. '{"0": "70GiB", "cpu": "200GiB"}' (keys: GPU indices,
            cpu); what does not fit goes to disk.
        offload_folder: folder for the weights offloaded to disk (needed when anything goes there).
    """

    device_map: str | None = None
    max_memory: dict[str, str] | None = None
    offload_folder: Path | None = None

    def __post_init__(self) -> None:
        if self.device_map is None:
            if self.max_memory or self.offload_folder:
                raise HeadlabError("--max_memory and --offload_folder need --device_map auto (or balanced, "
                                   "balanced_low_0, sequential)")
            return
        if self.device_map not in DEVICE_MAPS:
            raise HeadlabError(f"--device_map {self.device_map!r} is not a placement strategy; use one of "
                               f"{', '.join(DEVICE_MAPS)}")
        for key, value in (self.max_memory or {}).items():
            if not (str(key).isdigit() or key in ("cpu", "mps")):
                raise HeadlabError(f"--max_memory key {key!r} is not a device; use GPU indices (\"0\") or \"cpu\"")
            if not (isinstance(value, int) and value > 0) and not _SIZE.match(str(value)):
                raise HeadlabError(f"--max_memory {key}: {value!r} is not a size; write e.g. \"70GiB\" or \"500MB\"")

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """The ``from_pretrained`` keyword arguments of this placement."""
        out: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory:
            out["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in self.max_memory.items()}
        if self.offload_folder is not None:
            Path(self.offload_folder).mkdir(parents=True, exist_ok=True)
            out["offload_folder"] = str(self.offload_folder)
        return out

    def explain_load_error(self, error: BaseException) -> None:
        """Raise a one-line error for the placement mistakes accelerate reports (disk offload without a folder)."""
        if "offload_folder" in str(error) or "offload_dir" in str(error):
            raise HeadlabError("part of the model goes to disk under this --max_memory; pass --offload_folder DIR "
                               "(or allow more memory)") from error


def describe_placement(model: nn.Module) -> str:
    """One line naming where each part of a dispatched model went, e.g. ``device map: cpu: model.embed_tokens;
    disk: model.layers, model.norm, lm_head``."""
    placed: dict[str, list[str]] = {}
    for module, device in getattr(model, "hf_device_map", {}).items():
        placed.setdefault(str(device), []).append(module or "(whole model)")
    return "device map: " + "; ".join(f"{device}: {', '.join(parts)}" for device, parts in placed.items())


def real_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module``'s parameter or buffer ``name`` with real values: read through the offload when accelerate left it
    on ``meta`` (a copy), else the tensor itself."""
    tensor = getattr(module, name, None)
    if tensor is None or tensor.device.type != "meta":
        return tensor
    with module_weights(module):
        return getattr(module, name).detach().clone()


def materialized(module: nn.Module) -> nn.Module:
    """``module`` with real weights for reading outside the forward pass (OV circuits, attribution): the module
    itself when nothing of it is offloaded, else a copy on the CPU holding the real weights, without accelerate's
    hooks (one layer's attention or norm at a time: the offload stays the only full copy)."""
    tensors = [*module.parameters(), *module.buffers()]
    if not any(t.device.type == "meta" for t in tensors):
        return module
    import copy

    from accelerate.hooks import remove_hook_from_module

    twin = remove_hook_from_module(copy.deepcopy(module), recurse=True)
    for name, original in module.named_modules():
        target = twin.get_submodule(name) if name else twin
        with module_weights(original):
            for key, value in list(original.named_parameters(recurse=False)):
                setattr(target, key, nn.Parameter(value.detach().to("cpu", copy=True), requires_grad=False))
            for key, value in list(original.named_buffers(recurse=False)):
                setattr(target, key, value.detach().to("cpu", copy=True))
    return twin


@contextlib.contextmanager
def module_weights(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with real weights inside the block: an offloaded module's ``meta`` weights are loaded for the
    block (accelerate's ``align_module_device``), any other module is used as it is."""
    offloaded = any(p.device.type == "meta" for p in module.parameters(recurse=False))
    if not offloaded:
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module
