"""Weight adapters served on a shared base model, many at once, mixed in one batch.

Every unmerged LoRA-family model (LoRA, rsLoRA, DoRA, IA3) built on a base model uses
that model's one loaded copy. Its adapter is attached to the base model's target
layers as one *slot* of the model's AdapterHost, and each forward pass routes every row
of its batch to its own slot, or to none (slot 0: the rows of base, prompt-tuned and
other models). So requests for different adapters, and for soft prompts, decode in one
batch. Per row r with slot s, a target layer computes (as PEFT's layers do):

    LoRA, rsLoRA  y = W x + b + scaling_s * B_s A_s x
    DoRA          y = W x + b + (k_s - 1) (W x) + k_s * scaling_s * B_s A_s x,
                  k_s = m_s / ||W + scaling_s B_s A_s|| (per output, fixed at attach)
    IA3           y = (W x + b) * l_s, or on feedforward layers y = W (x * l_s) + b

Each layer keeps one row per slot of stacked tables (A, scaling * B, DoRA's k, IA3's
vectors); a batch gathers its rows' matrices for batched products, as Punica and S-LoRA
do, and a batch whose rows all use no adapter here runs the plain layer. Row 0 and the
rows of slots without an adapter on a layer are the identity (zeros and ones).

Adapters attach on first use and are detached least-recently-used beyond
`generation.max_adapters` / `generation.max_adapter_bytes`; one that a running request
uses is never detached. Attaching writes its slot's rows in place (no running row uses
that slot yet), or, when the tables must grow, builds bigger ones and swaps them in
with one assignment; either way a forward pass running at the same time is unaffected
and never waits.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import alog
import torch
import torch.nn.functional as F

log = alog.use_channel("ADAPTERS")


@dataclass(frozen=True)
class LayerAdapter:
    """One adapter's tensors for one target layer (float, on the layer's device)."""

    lora_a: torch.Tensor | None = None  # (r, in)
    lora_b: torch.Tensor | None = None  # (out, r)
    scaling: float = 1.0
    # DoRA's magnitude vector m (out,); k = m / ||W + scaling B A|| is computed at attach.
    magnitude: torch.Tensor | None = None
    # IA3's learned vector: on the input of feedforward layers (in,), else the output (out,).
    ia3: torch.Tensor | None = None
    ia3_feedforward: bool = False

    @property
    def nbytes(self) -> int:
        tensors = (self.lora_a, self.lora_b, self.magnitude, self.ia3)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class AdapterWeights:
    """A whole adapter: its tensors per target module (names as in the base model)."""

    layers: dict[str, LayerAdapter]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())


# -------------------------------------------------------------------- routing

_ROUTE = threading.local()


@contextlib.contextmanager
def routed(slots: torch.Tensor | int | None) -> Iterator[None]:
    """Route this thread's forward passes: `slots` (rows,) gives each row's slot, an int
    gives every row the same one, None or 0 uses no adapter."""
    outer = getattr(_ROUTE, "slots", None)
    _ROUTE.slots = slots
    try:
        yield
    finally:
        _ROUTE.slots = outer


@dataclass(frozen=True)
class _Tables:
    """A layer's adapters, one row per host slot: row s holds slot s's adapter, or the
    identity (zeros, ones) where slot s has none here. Attaching writes one row in place;
    only growing (more slots, a larger rank, a new kind of adapter) makes new tables."""

    present: torch.Tensor  # (slots,) bool: slot s has an adapter on this layer
    lora_a: torch.Tensor | None = None  # (slots, in, r_max): A transposed
    lora_b: torch.Tensor | None = None  # (slots, r_max, out): (scaling * B) transposed
    dora_k: torch.Tensor | None = None  # (slots, out); 1 where there is no DoRA
    ia3_in: torch.Tensor | None = None  # (slots, in)
    ia3_out: torch.Tensor | None = None  # (slots, out)

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[2]


class AdaptedLinear(torch.nn.Module):
    """A base model's linear layer, with every attached adapter's share of it. It holds
    the base layer's own weight and bias parameters, so the model's state dict (and any
    save of the base model) is the same as before it was wrapped."""

    def __init__(self, base: torch.nn.Linear, slots: int):
        super().__init__()
        self.weight = base.weight  # (out, in)
        self.bias = base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.tables = _Tables(present=torch.zeros(slots, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, seq, in)
        slots = getattr(_ROUTE, "slots", None)
        tables = self.tables  # read once: growing swaps the whole object
        if slots is None:
            return F.linear(x, self.weight, self.bias)
        if isinstance(slots, int):  # every row the same adapter: plain matrix products
            if not tables.present[slots]:
                return F.linear(x, self.weight, self.bias)
            return self._adapted(x, tables, lambda table: table[slots])
        if not bool(tables.present.index_select(0, slots).any()):
            return F.linear(x, self.weight, self.bias)
        # Each row's own matrices, gathered for batched products (as Punica / S-LoRA).
        return self._adapted(
            x, tables, lambda table: table.index_select(0, slots).unsqueeze(1), batched=True
        )

    def _adapted(self, x, tables: _Tables, rows, batched: bool = False) -> torch.Tensor:
        """W x + b with the adapters of `rows(table)` (per row when batched)."""
        inputs = x if tables.ia3_in is None else x * rows(tables.ia3_in)
        base = F.linear(inputs, self.weight, self.bias)  # (rows, seq, out)
        result = base
        if tables.lora_a is not None:
            a, b = rows(tables.lora_a), rows(tables.lora_b)
            if batched:  # (rows, 1, in, r) -> (rows, in, r)
                a, b = a.squeeze(1), b.squeeze(1)
                low_rank = torch.bmm(torch.bmm(x, a), b)
            else:
                low_rank = (x @ a) @ b
            if tables.dora_k is not None:
                k = rows(tables.dora_k)  # (rows, 1, out) or (out,)
                plain = base if self.bias is None else base - self.bias
                result = base + ((k - 1) * plain + k * low_rank)
            else:
                result = base + low_rank
        if tables.ia3_out is not None:
            result = result * rows(tables.ia3_out)
        return result

    # ---------------------------------------------------------- attachment

    def put(self, slot: int, adapter: LayerAdapter, slots: int) -> None:
        """Write `adapter` into row `slot` (no running row uses it), growing the tables
        to `slots` rows and to what the adapter needs first."""
        tables = self._grown(adapter, slots)
        weight = self.weight
        with torch.no_grad():
            if adapter.lora_a is not None:
                r = adapter.lora_a.shape[0]
                tables.lora_a[slot].zero_()
                tables.lora_b[slot].zero_()
                tables.lora_a[slot, :, :r] = adapter.lora_a.t()
                tables.lora_b[slot, :r] = (adapter.scaling * adapter.lora_b).t()
            if tables.dora_k is not None:
                magnitude = adapter.magnitude is not None
                tables.dora_k[slot] = _dora_scale(weight, adapter) if magnitude else 1
            for name, feedforward in (("ia3_in", True), ("ia3_out", False)):
                table = getattr(tables, name)
                if table is not None:
                    mine = adapter.ia3 is not None and adapter.ia3_feedforward == feedforward
                    table[slot] = adapter.ia3.flatten() if mine else 1
            tables.present[slot] = True
        self.tables = tables

    def resize(self, slots: int) -> None:
        """Rows for `slots` slots (the new ones without adapters)."""
        self.tables = self._grown(LayerAdapter(), slots)

    def drop(self, slot: int) -> None:
        """Turn row `slot` back into the identity (no running row uses it)."""
        tables = self.tables
        if slot >= tables.present.shape[0]:
            return
        with torch.no_grad():
            tables.present[slot] = False
            for table, value in (
                (tables.lora_a, 0),
                (tables.lora_b, 0),
                (tables.dora_k, 1),
                (tables.ia3_in, 1),
                (tables.ia3_out, 1),
            ):
                if table is not None:
                    table[slot] = value

    def _grown(self, adapter: LayerAdapter, slots: int) -> _Tables:
        """The current tables, or new ones holding them when `adapter` does not fit."""
        old = self.tables
        rank = max(old.rank, 0 if adapter.lora_a is None else adapter.lora_a.shape[0])
        needs = {
            "lora": rank > 0,
            "dora_k": old.dora_k is not None or adapter.magnitude is not None,
            "ia3_in": old.ia3_in is not None
            or (adapter.ia3 is not None and adapter.ia3_feedforward),
            "ia3_out": old.ia3_out is not None
            or (adapter.ia3 is not None and not adapter.ia3_feedforward),
        }
        slots = max(slots, old.present.shape[0])
        if (
            slots == old.present.shape[0]
            and rank == old.rank
            and needs["dora_k"] == (old.dora_k is not None)
            and needs["ia3_in"] == (old.ia3_in is not None)
            and needs["ia3_out"] == (old.ia3_out is not None)
        ):
            return old
        out, inp = self.weight.shape
        options = {"device": self.weight.device, "dtype": self.weight.dtype}

        def table(current, shape, fill):
            new = torch.full((slots, *shape), fill, **options)
            if current is not None:
                new[tuple(slice(0, n) for n in current.shape)] = current
            return new

        present = torch.zeros(slots, dtype=torch.bool, device=self.weight.device)
        present[: old.present.shape[0]] = old.present
        return _Tables(
            present=present,
            lora_a=table(old.lora_a, (inp, rank), 0) if needs["lora"] else None,
            lora_b=table(old.lora_b, (rank, out), 0) if needs["lora"] else None,
            dora_k=table(old.dora_k, (out,), 1) if needs["dora_k"] else None,
            ia3_in=table(old.ia3_in, (inp,), 1) if needs["ia3_in"] else None,
            ia3_out=table(old.ia3_out, (out,), 1) if needs["ia3_out"] else None,
        )


def _dora_scale(weight: torch.Tensor, adapter: LayerAdapter) -> torch.Tensor:
    """k = m / ||W + scaling B A|| row by row (out,), as PEFT's DoRA computes it."""
    with torch.no_grad():
        full = weight.float() + adapter.scaling * (adapter.lora_b.float() @ adapter.lora_a.float())
        return adapter.magnitude.float() / torch.linalg.norm(full, dim=1)


# ----------------------------------------------------------------------- host


@dataclass
class _Slot:
    key: str
    modules: tuple[str, ...]
    nbytes: int
    users: int = 0
    forgotten: bool = False  # its model is gone: drop it when its last request ends


@dataclass(frozen=True)
class AdapterLimits:
    max_adapters: int = 64
    max_bytes: int = 2**30


class AdapterHost:
    """The adapters attached to one base model, by key, in slots 1, 2, ... (slot 0 is no
    adapter). Every adapted layer's tables have a row per slot, grown together."""

    def __init__(self, model: torch.nn.Module, limits: AdapterLimits):
        self.model = model
        self.limits = limits
        self.rows = 1  # table rows of every adapted layer (slot 0 and the slots in use)
        self._lock = threading.Lock()
        self._slots: OrderedDict[int, _Slot] = OrderedDict()  # least recently used first
        self._by_key: dict[str, int] = {}
        self._layers: dict[str, AdaptedLinear] = {}
        self.attached_count = 0  # adapters attached so far (evictions make it exceed slots)

    @property
    def attached(self) -> list[str]:
        with self._lock:
            return [slot.key for slot in self._slots.values()]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(slot.nbytes for slot in self._slots.values())

    def acquire(self, key: str, weights: Callable[[], AdapterWeights]) -> int:
        """The slot of adapter `key`, attaching it (from `weights()`) when it is not;
        the caller releases it when its request ends."""
        with self._lock:
            slot = self._by_key.get(key)
            if slot is not None:
                self._slots.move_to_end(slot)
                self._slots[slot].users += 1
                return slot
        loaded = weights()  # read outside the lock: other adapters keep attaching
        with self._lock:
            slot = self._by_key.get(key)
            if slot is None:
                slot = self._attach_locked(key, loaded)
            self._slots.move_to_end(slot)
            self._slots[slot].users += 1
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            info = self._slots.get(slot)
            if info is not None:
                info.users -= 1
                if info.forgotten and not info.users:
                    self._drop_locked(slot)
                self._evict_locked()

    def detach(self, key: str) -> None:
        """Forget adapter `key` now if no request uses it, else when the last one ends
        (a retrained model's old adapter)."""
        with self._lock:
            slot = self._by_key.get(key)
            if slot is None:
                return
            if self._slots[slot].users:
                self._slots[slot].forgotten = True
            else:
                self._drop_locked(slot)

    def _attach_locked(self, key: str, weights: AdapterWeights) -> int:
        self._evict_locked(incoming=weights.nbytes)
        used = set(self._slots)
        slot = next(s for s in itertools.count(1) if s not in used)
        if slot >= self.rows:  # room for this slot and, amortised, the next ones
            self.rows = min(
                max(slot + 1, 2 * self.rows), max(slot + 1, self.limits.max_adapters + 1)
            )
            for layer in self._layers.values():
                layer.resize(self.rows)
        for name, adapter in weights.layers.items():
            self._layer(name).put(slot, adapter, self.rows)
        self._slots[slot] = _Slot(key, tuple(weights.layers), weights.nbytes)
        self._by_key[key] = slot
        self.attached_count += 1
        return slot

    def _evict_locked(self, incoming: int = 0) -> None:
        """Drop idle adapters, least recently used first, while over the limits."""

        def over() -> bool:
            count = len(self._slots) + (1 if incoming else 0)
            size = sum(s.nbytes for s in self._slots.values()) + incoming
            return count > self.limits.max_adapters or size > self.limits.max_bytes

        for slot in list(self._slots):
            if not over():
                return
            if not self._slots[slot].users:
                log.info("detaching adapter %s (least recently used)", self._slots[slot].key)
                self._drop_locked(slot)

    def _drop_locked(self, slot: int) -> None:
        info = self._slots.pop(slot)
        del self._by_key[info.key]
        for name in info.modules:
            self._layers[name].drop(slot)

    def _layer(self, name: str) -> AdaptedLinear:
        """The AdaptedLinear at module `name`, wrapping the base layer on first use."""
        layer = self._layers.get(name)
        if layer is None:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            base = getattr(parent, child)
            if not isinstance(base, torch.nn.Linear):
                raise ValueError(f"adapter target {name} is a {type(base).__name__}, not a Linear.")
            layer = AdaptedLinear(base, self.rows)
            setattr(parent, child, layer)
            self._layers[name] = layer
        return layer


def host_for(model: torch.nn.Module, limits: AdapterLimits) -> AdapterHost:
    """The adapter host of a (shared) base model, made on first use."""
    host = getattr(model, "_caikit_tuning_adapters", None)
    if host is None:
        with _HOSTS_LOCK:
            host = getattr(model, "_caikit_tuning_adapters", None)
            if host is None:
                host = AdapterHost(model, limits)
                model._caikit_tuning_adapters = host
    return host


_HOSTS_LOCK = threading.Lock()
_KEYS = itertools.count(1)


def new_key(name: str) -> str:
    """A key no other loaded adapter has (a retrained model gets a new one)."""
    return f"{name}#{next(_KEYS)}"


@dataclass
class AdapterUse:
    """What a served adapter model hands its generator: where its adapter goes, and
    how to read its weights when it is not attached."""

    host: AdapterHost
    key: str
    weights: Callable[[], AdapterWeights]
    slots: list[int] = field(default_factory=list)

    def acquire(self) -> int:
        return self.host.acquire(self.key, self.weights)

    def release(self, slot: int) -> None:
        self.host.release(slot)


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank
