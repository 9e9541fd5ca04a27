"""Two-head circuits that a task's target needs, read off attention patterns: the second half of its verdict.

Iteration (Cabannes et al. 2024, ``facebookresearch/pal``, ``src/cot/evals/cot.py::AttentionEval``): a layer-0 head
attends from the chain-of-thought positions to the end-of-input token ``EoI`` (found by identity; it writes EoI's
position), and a head in layer >= 1, the iteration head, attends from the query that produces ``s_t`` to ``x_t``
(it matches ``p - pos(EoI)`` against the key's position). Their two scores, per sequence with ``n`` inputs and
``EoI`` at ``eoi`` (``eos = eoi + n + 1``, the position after ``s_n``):

* ``layer0_eoi_attention``: ``mean A[0][eoi+1 : eos, eoi]`` (the CoT positions ``s_1 .. s_n`` to EoI);
* ``layer1_diagonal``: ``mean diag(A[l][eoi : eos-1, eoi-n : eoi])`` (the queries ``EoI, s_1 .. s_{n-1}`` to
  ``x_1 .. x_n``; their ``1:eoi`` is ``x_1 .. x_n`` behind a task token, here ``x_1`` may follow a filler prefix).

Each is the mean over sequences of the per-sequence mean; with several heads, the best head of layer 0 and the best
head of the layers >= 1. The circuit *passes* when both reach the iteration role's attention floor (0.3 of the
head's attention, :data:`roles.rule.FLOORS`). A layer-0 "diagonal" read off absolute positions (what the toy learned
with fixed-start inputs) attends to ``x_t`` without looking at EoI, and fails the first half.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from data.tasks import Batch, Task
from roles.patterns import attention_patterns
from roles.rule import floor_of
from toymodels.ioi_circuit import NameMoverCircuit, name_mover_circuit


@dataclass
class IterationCircuit:
    """The two halves of the iteration circuit in one model (see the module docstring)."""

    layer0_eoi_attention: float
    layer0_head: int
    layer1_diagonal: float
    diagonal_layer: int | None
    diagonal_head: int | None
    floor: float

    @property
    def passed(self) -> bool:
        return self.layer0_eoi_attention >= self.floor and self.layer1_diagonal >= self.floor

    def partners(self, n_layers: int, n_heads: int) -> torch.Tensor:
        """Bool ``[layer, head]``: the layer-0 EoI head when its half of the circuit passes (its attention to EoI
        reaches the floor). It has a function, so the iteration head's functional check must not use it as a
        "random" reference head (:meth:`roles.table.RoleTable.build`): in Cabannes et al.'s 2 x 1 model it is the
        only other head, and ablating it costs more than ablating the iteration head it feeds."""
        mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        mask[0, self.layer0_head] = self.layer0_eoi_attention >= self.floor
        return mask

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def line(self) -> str:
        where = f"L{self.diagonal_layer}H{self.diagonal_head}" if self.diagonal_layer is not None else "none"
        return (f"iteration circuit: layer-0 attention to EoI {self.layer0_eoi_attention:.3f} (L0H{self.layer0_head}),"
                f" diagonal in layer >= 1 {self.layer1_diagonal:.3f} ({where}); floor {self.floor:.2f}, "
                f"passed={self.passed}")


def iteration_scores(patterns: torch.Tensor, eoi: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the EoI attention and the diagonal: ``[layer, head]`` each, means over sequences of the
    per-sequence means.

    ``patterns`` ``[batch, layer, head, query, key]``; ``eoi`` ``[batch]`` the position of EoI; ``n`` ``[batch]``
    the number of inputs (``x_1 .. x_n`` sit at ``eoi - n .. eoi - 1``, ``s_1 .. s_n`` at ``eoi + 1 .. eoi + n``).
    """
    b = patterns.shape[0]
    eoi_attention, diagonal = [], []
    for k in range(b):
        e, m = int(eoi[k]), int(n[k])
        if m < 1:
            raise ValueError(f"sequence {k} has no inputs before its EoI")
        a = patterns[k].double()  # [L, H, T, T]
        eoi_attention.append(a[:, :, e + 1:e + m + 1, e].mean(-1))
        steps = torch.arange(m)
        diagonal.append(a[:, :, e + steps, e - m + steps].mean(-1))
    return torch.stack(eoi_attention).mean(0).float(), torch.stack(diagonal).mean(0).float()


def iteration_circuit(model: nn.Module, task: Task, batch: Batch, floor: float) -> IterationCircuit:
    """The two halves of the iteration circuit of ``model`` on ``batch`` (a batch of the iteration task)."""
    ids = batch["input_ids"]
    is_eoi = ids == task.sep
    if not bool((is_eoi.sum(1) == 1).all()):
        raise ValueError("every iteration sequence needs exactly one EoI token")
    eoi = is_eoi.int().argmax(1)
    n = batch["iteration_mask"].sum((1, 2))  # one query per input
    patterns = attention_patterns(model, ids)
    return circuit_of(*iteration_scores(patterns, eoi, n), floor)


def circuit_of(eoi_attention: torch.Tensor, diagonal: torch.Tensor, floor: float) -> IterationCircuit:
    """The verdict from the per-head scores ``[layer, head]``: layer 0's best EoI head, the best diagonal above it."""
    layer0_head = int(eoi_attention[0].argmax())
    if diagonal.shape[0] < 2:  # one layer: no head above layer 0
        return IterationCircuit(float(eoi_attention[0, layer0_head]), layer0_head, 0.0, None, None, floor)
    above = diagonal[1:]
    best = int(above.argmax())
    layer, head = divmod(best, above.shape[1])
    return IterationCircuit(float(eoi_attention[0, layer0_head]), layer0_head, float(above[layer, head]), layer + 1,
                            head, floor)


CIRCUITS = {"iteration": iteration_circuit, "ioi": name_mover_circuit}
"""Task name -> the circuit its target also needs (``toy`` reports it in ``metrics.json`` under ``circuit``): the
iteration circuit above, and IOI's selective name movers (:mod:`toymodels.ioi_circuit`)."""


def task_circuit(model: nn.Module, task: Task, batch: Batch,
                 floors: Mapping[str, float] | None = None) -> IterationCircuit | NameMoverCircuit | None:
    """The circuit ``task``'s target also needs, measured on toy ``model`` over ``batch`` at the target role's floor
    (``floors``: the run's overrides), or None for a task without one; its ``partners(n_layers, n_heads)`` are the
    heads the functional check leaves out of its random reference."""
    if task.name not in CIRCUITS:
        return None
    return CIRCUITS[task.name](model, task, batch, floor_of(task.role, model.config.head_dim, floors))
