"""Count, on CPU, the operations that would block the host on an accelerator.

A blocking host sync is any point where the CPU must wait for the device queue to drain: reading
a device value on the host (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, ``.numpy()``,
``.cpu()``), and ops whose output *shape* depends on device data, which CUDA implements by
copying a count to the host (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing
``x[mask]`` / ``x[mask] = v``, ``repeat_interleave`` without ``output_size``, ``bincount``, which
reads min/max even with ``minlength``, ``equal``). ``nonzero_static`` and ops with host-known
sizes do not sync; neither do collectives (not counted here).

On CPU every tensor lives on the host, so :class:`SyncAudit` tracks which tensors *would* be on
the accelerator: the ones it is told about (module parameters, buffers and tensor attributes,
inputs) and every result of an op that reads one, plus factory outputs (``torch.arange(...,
device=x.device)``; conservative: a factory made for the host would be counted too). Tensors
built from Python data (``torch.tensor(list)``) and the results of a counted ``.cpu()`` are host
tensors, and reading them is free, as on a GPU (e.g. ``tokens_per_expert.tolist()`` in
Megatron's SequentialMLP).

Usage::

    audit = SyncAudit().track(layer, x)
    with audit:
        out = layer(x); audit.phase = "backward"; out.sum().backward()
    audit.count("forward"), audit.events
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator
from unittest import mock

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten

# Ops that always make the host wait on CUDA (data-dependent output size or a scalar readout).
ALWAYS_SYNC = {
    aten._local_scalar_dense,  # .item(), bool(t), int(t), float(t)
    aten.nonzero,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
    aten.bincount,  # CUDA reads min() and max() on the host, minlength or not
    aten.equal,
}
# Indexing ops that sync when an index is a boolean mask (expanded with nonzero).
MASK_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# Tensor methods that read device data on the host without a dispatched aten op.
HOST_READS = ("tolist", "numpy", "cpu")


def _tensors(tree) -> list:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


class SyncAudit(TorchDispatchMode):
    """A dispatch mode (plus ``tolist``/``numpy``/``cpu`` wrappers) that records one event per
    host-blocking operation on an accelerator-resident tensor, labelled with ``phase``.

    Attributes:
        phase: label of the events recorded now (the caller switches it, e.g. from hooks).
        events: ``[(phase, op name)]`` in order.
        counting: False suspends recording (e.g. inside a stand-in for a non-blocking copy).
    """

    def __init__(self):
        super().__init__()
        self._device = WeakTensorKeyDictionary()
        self.events: list = []
        self.phase = "forward"
        self.counting = True
        self._patches: list = []

    # ---- what lives on the device ----------------------------------------------------------
    def track(self, *objects) -> "SyncAudit":
        """Mark tensors, and every parameter, buffer and tensor attribute of modules (including
        tensors in dict attributes, e.g. cached statistics), as accelerator-resident."""
        for obj in objects:
            if isinstance(obj, torch.Tensor):
                self._device[obj] = True
            elif isinstance(obj, torch.nn.Module):
                for module in obj.modules():
                    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
                    attributes = [
                        v for v in vars(module).values()
                        if isinstance(v, (dict, list, tuple, torch.Tensor))
                    ]
                    for t in own + _tensors(attributes):
                        self._device[t] = True
        return self

    def on_device(self, t: torch.Tensor) -> bool:
        """True for a tracked tensor or a view of one (views share the root's storage)."""
        return t in self._device or (t._base is not None and t._base in self._device)

    def host(self, t: torch.Tensor) -> torch.Tensor:
        """Declare ``t`` (a fresh copy, not a view) a host tensor: a device->host copy's result."""
        self._device.pop(t, None)
        return t

    # ---- counting ---------------------------------------------------------------------------
    def record(self, op: str) -> None:
        if self.counting:
            self.events.append((self.phase, op))

    def count(self, phase: str) -> int:
        return sum(1 for p, _ in self.events if p == phase)

    def summary(self) -> dict:
        """{phase: {op: count}}."""
        out: dict = {}
        for phase, op in self.events:
            out.setdefault(phase, Counter())[op] += 1
        return {p: dict(c) for p, c in out.items()}

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Do not record inside (the model of a non-blocking copy whose wait comes later)."""
        previous, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        resident = any(self.on_device(t) for t in inputs) or not inputs  # factories: device
        packet = func.overloadpacket
        if resident:
            if packet in ALWAYS_SYNC:
                self.record(packet.__name__)
            elif packet in MASK_INDEXING and any(
                t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1:2])
            ):
                self.record(f"{packet.__name__} with a boolean mask")
            elif (
                packet is aten.repeat_interleave
                and func._overloadname in ("Tensor", "self_Tensor")  # repeats given as a tensor
                and kwargs.get("output_size") is None
            ):
                self.record("repeat_interleave without output_size")
        out = func(*args, **kwargs)
        if resident:
            # Results, and tensors written in place (with the storage they view): device data
            # written into a tensor makes it device data.
            written = [
                value
                for arg, value in zip(func._schema.arguments, args)
                if arg.alias_info is not None and arg.alias_info.is_write
            ]
            for t in _tensors(out) + _tensors(written):
                self._device[t] = True
                if t._base is not None:
                    self._device[t._base] = True
        return out

    # ---- host reads that bypass the dispatcher ----------------------------------------------
    def _wrap(self, name: str):
        original = getattr(torch.Tensor, name)
        audit = self

        def wrapper(t, *args, **kwargs):
            if not audit.on_device(t):
                return original(t, *args, **kwargs)
            audit.record(f"Tensor.{name}")
            if name != "cpu":
                return original(t, *args, **kwargs)
            # On CPU .cpu() returns the tensor itself; model the device->host copy as a new host
            # tensor so later reads of it are free, as on a GPU.
            with audit.suspended():
                copy = original(t, *args, **kwargs).clone()
            return audit.host(copy)

        return wrapper

    def __enter__(self):
        self._patches = [mock.patch.object(torch.Tensor, n, self._wrap(n)) for n in HOST_READS]
        for patch in self._patches:
            patch.start()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for patch in reversed(self._patches):
                patch.stop()
            self._patches = []


def megatron_alltoall_dtoh(audit: SyncAudit):
    """A stand-in for ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`` that models what
    the real one does on a GPU: at ``cuda_dtoh_point`` it queues non-blocking device->host copies
    of the split sizes and token counts (no wait; here: host copies made without recording), and
    at ``cuda_sync_point`` it waits on one event (recorded as one sync). Split sizes become
    Python lists, as gloo requires (``tests/megatron_cpu.py`` does the same)."""

    def to_host(x, as_list=False):
        if not isinstance(x, torch.Tensor):
            return x
        with audit.suspended():
            copy = audit.host(x.detach().clone())
        return copy.tolist() if as_list else copy

    def dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if self.drop_and_pad:
            return tokens_per_expert
        if point == self.cuda_dtoh_point:
            tokens_per_expert = to_host(tokens_per_expert)
            self.input_splits = to_host(self.input_splits, as_list=True)
            self.output_splits = to_host(self.output_splits, as_list=True)
            self.output_splits_tp = to_host(self.output_splits_tp, as_list=True)
            self.num_out_tokens = to_host(self.num_out_tokens)
            if self.num_local_experts > 1 and not self.config.moe_permute_fusion:
                self.num_global_tokens_per_local_expert = to_host(
                    self.num_global_tokens_per_local_expert
                )
        if point == self.cuda_sync_point:
            audit.record("Event.synchronize (Megatron's cuda_sync_point)")
        return tokens_per_expert

    return dtoh_and_synchronize


def megatron_permute_syncs() -> dict:
    """``{op: count}`` of the host syncs in Megatron's unfused ``moe_utils.permute`` (the path
    without TE), called with probs as its alltoall dispatcher does: 0.16 selects tokens and probs
    with ``masked_select`` (2 syncs); 0.19 sorts with ``argsort`` into host-known sizes (none).
    Measured, so a reference count of Megatron's layer follows the installed release."""
    from megatron.core.transformer.moe.moe_utils import permute

    routing_map = torch.tensor([[True, False, True], [False, True, True]])  # [tokens, experts]
    tokens, probs = torch.randn(2, 4), torch.rand(2, 3)
    audit = SyncAudit().track(tokens, probs, routing_map)
    with audit:
        permute(tokens, routing_map, probs=probs, num_out_tokens=4)
    return audit.summary().get("forward", {})


def audit_router(router, hidden_size: int, tokens: int = 16, padded: int = 3) -> SyncAudit:
    """One forward + backward of a C2R ``router`` as our MoE layer runs it (the finite check
    deferred into the dispatcher) on ``tokens`` x 2 inputs whose last ``padded`` tokens of each
    sequence are padding, under a SyncAudit (phases: forward, backward)."""
    router.defer_finite_check = True
    x = torch.randn(tokens, 2, hidden_size, requires_grad=True)
    mask = torch.zeros(tokens, 2, dtype=torch.bool)
    mask[-padded:] = True
    audit = SyncAudit().track(router, x, mask)
    with audit:
        probs, _ = router(x, padding_mask=mask)
        audit.phase = "backward"
        probs.sum().backward()
    return audit
