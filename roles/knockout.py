"""Attention knockout (Geva et al. 2023, "Dissecting Recall of Factual Associations in Auto-Regressive Language
Models", section 5): cut the edges from the final position to the subject's tokens in chosen heads and read how much
the correct answer's log-probability drops.

Knockout of head ``h`` in layer ``l``: its attention scores from the last query to the subject keys are set to
``-inf`` before the softmax, so its weights renormalise over the other keys,
``a'_k = a_k [k not in S] / sum_{j not in S} a_j``; every other head, layer and query is untouched. The mask is
added to the additive attention mask one attention module receives (``[rows, heads, query, key]``, broadcast over
the heads elsewhere), so it works for any architecture whose attention adds ``attention_mask`` to its scores (GPT-2,
GPT-NeoX, Llama and grouped-query relatives under eager or sdpa attention).

Only the final position changes, so the prompt minus its last token is run once (:class:`PrefixRun`, its key/value
cache) and every knockout reruns the last token alone. A *plan* is a bool ``[layer, head]`` of the heads cut
together; many plans run as one batch (prompt-major rows ``b * plans + p``): one plan per head gives the per-head
localiser, one per window of ``k`` consecutive layers (all heads) gives Geva et al.'s window scan. The same runs can
instead *patch* the planned heads' final-position outputs from other prompts (activation patching of ``z_h``,
:meth:`PrefixRun.log_probs` with a ``source``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from headlab.errors import HeadlabError
from headlab.heads import HeadFn, HeadSite, head_sites, hook_heads
from headlab.models import input_device


def attention_module(model: nn.Module, site: HeadSite) -> nn.Module:
    """The attention module of ``site``'s layer: the parent of its output projection (it receives the mask)."""
    parent = site.name.rsplit(".", 1)[0]
    return model.get_submodule(parent)


def _base_mask(mask: torch.Tensor | None, rows: int, queries: int, keys: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """The additive mask the module would have used, ``[rows or 1, 1 or heads, queries, keys]`` (causal when the
    model passed none)."""
    low = torch.finfo(dtype).min
    if mask is None:
        q = torch.arange(keys - queries, keys, device=device)[:, None]
        k = torch.arange(keys, device=device)[None, :]
        return torch.where(k > q, low, 0.0).to(dtype)[None, None]
    mask = mask[..., :keys]
    if mask.dtype == torch.bool:  # True = attend
        return torch.where(mask, 0.0, low).to(dtype)
    return mask.to(dtype)


@contextmanager
def knock_out(model: nn.Module, cuts: dict[int, torch.Tensor], sites: list[HeadSite] | None = None
              ) -> Iterator[None]:
    """Inside the block, layer ``l``'s heads cannot attend from the last query to the keys where ``cuts[l]`` (bool
    ``[rows, heads, keys]``, keys counted over the whole sequence including a cache) is True."""
    sites = sites if sites is not None else head_sites(model)
    handles = []

    def make_hook(cut: torch.Tensor):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            rows, queries = hidden.shape[:2]
            if cut.shape[0] != rows:
                raise HeadlabError(f"knockout mask has {cut.shape[0]} rows for a batch of {rows}")
            keys = cut.shape[-1]
            base = _base_mask(kwargs.get("attention_mask"), rows, queries, keys, hidden.dtype, hidden.device)
            extra = torch.zeros(rows, cut.shape[1], queries, keys, dtype=hidden.dtype, device=hidden.device)
            extra[:, :, -1] = torch.where(cut.to(hidden.device), torch.finfo(hidden.dtype).min, 0.0)
            kwargs["attention_mask"] = (base + extra).clamp_min(torch.finfo(hidden.dtype).min)
            return args, kwargs

        return hook

    try:
        for site in sites:
            if site.layer in cuts:
                module = attention_module(model, site)
                handles.append(module.register_forward_pre_hook(make_hook(cuts[site.layer]), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes a key/value cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefixRun:
    """The clean run of ``input_ids[:, :-1]`` ``[B, T - 1]`` (its key/value cache), to rerun the last token under
    knockout plans without recomputing the prefix."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, subject: torch.Tensor):
        self.model, self.sites = model, head_sites(model)
        self.cache_argument = _cache_argument(model)
        self.device = input_device(model)
        self.ids = input_ids.to(self.device)
        self.subject = subject.bool()  # [B, T]
        if self.subject[:, -1].any():
            raise HeadlabError("the subject mask covers the final position; knockout cuts edges from it to earlier "
                               "tokens")
        with torch.no_grad():
            out = model(input_ids=self.ids[:, :-1], use_cache=True)
            self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            self._check_cache()

    def _check_cache(self, tolerance: float = 1e-3) -> None:
        """Fail unless the last token run from the cache gives the full forward pass's logits."""
        cache, last = self._runs(1)
        cached = self.model(input_ids=last, use_cache=True, **cache).logits[:, -1].float()
        full = self.model(input_ids=self.ids).logits[:, -1].float()
        gap = float((cached - full).abs().max())
        if gap > tolerance * max(1.0, float(full.abs().max())):
            raise HeadlabError(f"the key/value cache did not reproduce the full forward pass (max |logit gap| "
                               f"{gap:.3g}); {type(self.model).__name__}.forward must take the cache as "
                               f"`{self.cache_argument}`")

    def _runs(self, n_plans: int) -> tuple[dict, torch.Tensor]:
        """A fresh copy of the prefix cache (as the forward's keyword argument) and the last tokens, each repeated
        ``n_plans`` times (prompt-major)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(n_plans)
        return {self.cache_argument: cache}, self.ids[:, -1:].repeat_interleave(n_plans, 0)

    def _cuts(self, plans: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per layer, bool ``[B * P, H, T]``: the subject keys each row's heads may not see from the last query."""
        batch, n_plans = self.ids.shape[0], plans.shape[0]
        subject = self.subject.to(self.device)
        cuts = {}
        for site in self.sites:
            per_plan = plans[:, site.layer].to(self.device)  # [P, H]
            if per_plan.any():
                cut = per_plan[None, :, :, None] & subject[:, None, None, :]  # [B, P, H, T]
                cuts[site.layer] = cut.reshape(batch * n_plans, *cut.shape[2:])
        return cuts

    def _patch(self, plans: torch.Tensor, source: dict[int, torch.Tensor]) -> HeadFn:
        """Replace the planned heads' final-position outputs with ``source[layer]`` ``[B, H, d_head]``."""
        n_plans = plans.shape[0]

        def fn(layer: int, z: torch.Tensor) -> torch.Tensor | None:  # z: [B * P, 1, H, d_head]
            chosen = plans[:, layer].to(z.device)  # [P, H]
            if not chosen.any():
                return None
            rows = chosen.repeat(self.ids.shape[0], 1)[..., None]  # [B * P, H, 1]
            z = z.clone()
            z[:, -1] = torch.where(rows, source[layer].to(z.device, z.dtype).repeat_interleave(n_plans, 0), z[:, -1])
            return z

        return fn

    @torch.no_grad()
    def final_outputs(self) -> dict[int, torch.Tensor]:
        """Every head's clean output at the final position: ``{layer: [B, H, d_head]}``."""
        cache, last = self._runs(1)
        kept: dict[int, torch.Tensor] = {}
        with hook_heads(self.model, lambda layer, z: kept.__setitem__(layer, z[:, -1].clone()), sites=self.sites):
            self.model(input_ids=last, use_cache=True, **cache)
        return kept

    @torch.no_grad()
    def log_probs(self, plans: torch.Tensor, tokens: torch.Tensor, source: dict[int, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        """``log p(tokens)`` at the final position under each plan: ``plans`` bool ``[P, L, H]`` (an all-False plan is
        the clean run), ``tokens`` ``[B, n]``; returns ``[B, P, n]``. The planned heads are knocked out, or with
        ``source`` (:meth:`final_outputs` of other prompts, aligned with these) patched at the final position."""
        n_plans, batch = plans.shape[0], self.ids.shape[0]
        cache, last = self._runs(n_plans)
        edit = knock_out(self.model, self._cuts(plans), self.sites) if source is None else \
            hook_heads(self.model, self._patch(plans, source), sites=self.sites)
        with edit:
            logits = self.model(input_ids=last, use_cache=True, **cache).logits[:, -1].float()
        logp = logits.log_softmax(-1).view(batch, n_plans, -1)
        index = tokens.to(self.device)[:, None, :].expand(-1, n_plans, -1)
        return logp.gather(-1, index).cpu()


def knockout_log_probs(run: PrefixRun, plans: torch.Tensor, tokens: torch.Tensor, max_rows: int = 512,
                       source: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """:meth:`PrefixRun.log_probs` over many plans, in chunks of at most ``max_rows`` rows: ``[B, P, n]``."""
    batch = run.ids.shape[0]
    step = max(1, max_rows // batch)
    return torch.cat([run.log_probs(plans[i:i + step], tokens, source) for i in range(0, plans.shape[0], step)], 1)


def head_plans(n_layers: int, n_heads: int) -> torch.Tensor:
    """One plan per head, layer-major: ``[L * H, L, H]``."""
    return torch.eye(n_layers * n_heads, dtype=torch.bool).view(-1, n_layers, n_heads)


def window_plans(n_layers: int, n_heads: int, window: int) -> torch.Tensor:
    """One plan per window of ``window`` consecutive layers (every head), starting at layer ``0 .. L - window``
    (Geva et al. 2023 use windows of 9 layers of GPT-2 XL's 48 and GPT-J's 28): ``[L - window + 1, L, H]``."""
    if not 1 <= window <= n_layers:
        raise HeadlabError(f"knockout window {window} is not between 1 and the model's {n_layers} layers")
    starts = torch.arange(n_layers - window + 1)[:, None]
    layers = torch.arange(n_layers)[None, :]
    inside = (layers >= starts) & (layers < starts + window)  # [W, L]
    return inside[:, :, None].expand(-1, -1, n_heads).clone()


def default_window(n_layers: int) -> int:
    """Geva et al.'s window scaled to the model's depth: ``round(9 / 30 * L)``, at least 1 (9 for 30 layers)."""
    return max(1, round(0.3 * n_layers))
