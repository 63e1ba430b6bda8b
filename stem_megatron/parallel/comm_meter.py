"""Bytes moved by collectives, by kind and by purpose (tp, pp, dp-dense, dp-stem, other).

While counting, the meter wraps torch.distributed's collective and point-to-point functions
(megatron-core, its DDP and our STEM code all call them through the module, so every call is
seen) and adds each call's payload to a counter: the bytes of the tensor(s) this rank
hands to a collective, and the bytes it sends point-to-point (receives are the peer's sends).
Purpose comes from the process group: the tensor-parallel group is `tp`, point-to-point
traffic and the tied embedding's gradient sum over the first and last stages are `pp`, the
data-parallel group is `dp-stem` (our table collectives) unless the DDP buckets' syncs mark
theirs `dp-dense`; anything else (loss and grad-norm reductions) is `other`. The wrappers
exist only inside `counting()`; nothing else in torch changes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections import defaultdict

import torch.distributed as dist

# torch.distributed function -> kind reported in metrics
_KINDS = {
    "all_reduce": "all_reduce",
    "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "broadcast": "broadcast",
    "all_to_all": "all_to_all",
    "all_to_all_single": "all_to_all",
    "isend": "p2p",
    "irecv": "p2p",
    "send": "p2p",
    "recv": "p2p",
}
PURPOSES = ("tp", "pp", "dp-dense", "dp-stem", "other")
# megatron-core modules that bind the gather/scatter functions at import under their own
# names (sequence parallelism, DDP buckets): counted as the torch function they alias.
_ALIASING_MODULES = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.distributed.param_and_grad_buffer",
)
_ALIASES = {
    "dist_all_gather_func": "all_gather_into_tensor",
    "dist_reduce_scatter_func": "reduce_scatter_tensor",
}
# Position of the `group` argument of the collectives that take one.
_GROUP_ARG = {
    "all_reduce": 2,
    "broadcast": 2,
    "all_gather": 2,
    "all_gather_into_tensor": 2,
    "reduce_scatter_tensor": 3,
    "all_to_all": 2,
    "all_to_all_single": 4,
}


def _payload_bytes(name: str, args, kwargs) -> int:
    """Bytes this rank contributes: the input tensor(s) of the call."""
    if name in ("all_gather",):  # all_gather(tensor_list, tensor)
        tensor = args[1] if len(args) > 1 else kwargs["tensor"]
    elif name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):
        tensor = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input"))
    elif name == "all_to_all":
        return sum(
            t.numel() * t.element_size()
            for t in (args[1] if len(args) > 1 else kwargs["input_tensor_list"])
        )
    else:
        tensor = args[0] if args else kwargs["tensor"]
    return tensor.numel() * tensor.element_size()


class CommMeter:
    def __init__(self, tp_group=None, dp_group=None, dp_size: int = 1, embedding_group=None):
        self.tp_group, self.dp_group, self.dp_size = tp_group, dp_group, dp_size
        self.embedding_group = embedding_group
        self._purpose: str | None = None
        self.bytes_by_purpose: dict[str, int] = defaultdict(int)
        self.bytes_by_kind: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def counting(self):
        """Count every collective issued inside (a training step, an evaluation)."""
        originals = {name: getattr(dist, name) for name in _KINDS}
        for name, original in originals.items():
            setattr(dist, name, self._counting(name, original))
        aliases = [
            (module, alias, getattr(module, alias), name)
            for module in map(importlib.import_module, _ALIASING_MODULES)
            for alias, name in _ALIASES.items()
            if hasattr(module, alias)
        ]
        for module, alias, original, name in aliases:
            setattr(module, alias, self._counting(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)
            for module, alias, original, _ in aliases:
                setattr(module, alias, original)

    @contextlib.contextmanager
    def purpose(self, purpose: str):
        """Attribute the collectives issued inside to `purpose`."""
        previous, self._purpose = self._purpose, purpose
        try:
            yield
        finally:
            self._purpose = previous

    def _classify(self, name: str, group) -> str:
        if self._purpose is not None:
            return self._purpose
        if _KINDS[name] == "p2p":
            return "pp"
        if group is not None and group is self.tp_group:
            return "tp"
        if group is not None and group is self.embedding_group:
            return "pp"
        if group is not None and group is self.dp_group and self.dp_size > 1:
            return "dp-stem"
        return "other"

    def _counting(self, name: str, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            group = kwargs.get("group")
            index = _GROUP_ARG.get(name)
            if group is None and index is not None and len(args) > index:
                group = args[index]
            # Receives are the peer's sends; a one-rank group moves nothing.
            if name in ("irecv", "recv") or dist.get_world_size(group) == 1:
                return original(*args, **kwargs)
            nbytes = _payload_bytes(name, args, kwargs)
            self.bytes_by_purpose[self._classify(name, group)] += nbytes
            self.bytes_by_kind[_KINDS[name]] += nbytes
            return original(*args, **kwargs)

        return wrapper

    def attributed(self, purpose: str, fn):
        """`fn` with the collectives it issues counted as `purpose` (megatron-core DDP's bucket
        syncs are `dp-dense`: they share the data-parallel group with our table collectives)."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self.purpose(purpose):
                return fn(*args, **kwargs)

        return wrapper

    def take(self) -> dict[str, float]:
        """Metrics for the bytes counted since the last call, then reset. Every purpose and
        kind is reported, zeros included: `comm/all_to_all_bytes` 0 is the logged proof that
        no layout uses an all-to-all."""
        metrics = {
            f"comm/{p.replace('-', '_')}_bytes": float(self.bytes_by_purpose.get(p, 0))
            for p in PURPOSES
        }
        metrics.update(
            {
                f"comm/{kind}_bytes": float(self.bytes_by_kind.get(kind, 0))
                for kind in dict.fromkeys(_KINDS.values())
            }
        )
        self.bytes_by_purpose.clear()
        self.bytes_by_kind.clear()
        return metrics
