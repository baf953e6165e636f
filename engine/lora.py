"""Multi-LoRA: PEFT adapters served beside their base model, many in one batch (S-LoRA / Punica style).

An adapter is read into host memory once (`read_adapter`: each target's A, and B scaled by alpha/r) and copied
into one of `max_loras` device slots when a request that uses it is admitted (`Adapters.acquire`; a slot no
admitted request uses is reused, least recently used first). Per decoder layer and projection group (q/k/v
fused as qkv, gate/up as gate_up, o, down) the slots are one A [slots * k*R, in] and one B [out, slots * k*R]
(R = max_lora_rank, smaller ranks zero-padded; the fused groups' B block-diagonal, so one pair of matmuls
serves the whole group). Each rank holds the slice of B (column-parallel groups: qkv, gate_up) or of A
(row-parallel: o, down) that matches its slice of the base weight, so the delta joins the base output before
the layer's all-reduce. Rank 0 decides which adapter each slot holds; the slots it refills go to the other
ranks with the step's input (`StepInput.lora_places`: slot, name, folder), and each reads its own slices there.

In a step, every token goes through every slot's A at once (x @ A.T: [tokens, slots * k*R]), a mask keeps the
columns of its own slot (a one-hot over slots, zero for a token without an adapter), and one matmul with B adds
the delta: three kernels a group whatever the adapters in the batch, and fixed shapes. The extra bytes read
are the slots' A and B (8 slots of rank 16 on Llama-3-8B's shapes: ~10% of the base weights). A request's KV
blocks hash from a root of the model, the adapter's name and a digest of its weights (`Adapter.root`), so two
adapters, or an adapter and its base, never share a cached block.
"""

import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash

from engine.errors import RequestError
from engine.layers import MLP
from protocol.block_hash import root_hash

# PEFT module name -> (the projection group it joins, its place in the group)
TARGETS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
           "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}
GROUP_SIZE = {"qkv": 3, "o": 1, "gate_up": 2, "down": 1}
ROW_PARALLEL = {"o", "down"}  # their input is split over the ranks (A sliced); the others' output (B sliced)
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(slots=True)
class Adapter:
    """A LoRA adapter in host memory: for each (layer, module), A [r, in] and B [out, r] with the scale in B."""

    name: str
    path: str  # its folder (the other ranks of a parallel worker read their slices there)
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    root: int  # the root of its requests' block hash chain


def read_adapter(path: str | Path, name: str, model_name: str, num_layers: int, max_rank: int) -> Adapter:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), checked against what the
    engine serves: rank <= max_rank, attention and dense-MLP projections only, no bias, DoRA or saved modules."""
    from safetensors.torch import load

    folder = Path(path)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise RequestError(f"adapter {name!r}: no readable adapter_config.json in {folder}: {e}") from e
    unsupported = [(config.get("peft_type", "LORA") != "LORA", f"peft_type {config.get('peft_type')!r} (LORA only)"),
                   (config.get("bias", "none") != "none", "trained biases"),
                   (bool(config.get("use_dora")), "DoRA"),
                   (bool(config.get("modules_to_save")), "modules_to_save"),
                   (bool(config.get("fan_in_fan_out")), "fan_in_fan_out"),
                   (bool(config.get("rank_pattern") or config.get("alpha_pattern")), "per-module ranks or alphas")]
    for bad, what in unsupported:
        if bad:
            raise RequestError(f"adapter {name!r}: {what} are not supported")
    r = int(config["r"])
    if not 0 < r <= max_rank:
        raise RequestError(f"adapter {name!r} has rank {r}; this worker serves ranks up to {max_rank} "
                           "(--max-lora-rank)")
    scale = float(config.get("lora_alpha", r)) / (math.sqrt(r) if config.get("use_rslora") else r)
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise RequestError(f"adapter {name!r}: no adapter_model.safetensors in {folder} (save it with safetensors)")
    data = file.read_bytes()  # (read once: the tensors and the digest of the root both come from it)
    tensors = load(data)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m is None or m.group(3) not in TARGETS or int(m.group(1)) >= num_layers:
            raise RequestError(f"adapter {name!r}: tensor {key!r} is not a LoRA weight of a decoder layer's "
                               f"projection ({', '.join(TARGETS)})")
        halves.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = t.float()
    weights = {}
    for (layer, module), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise RequestError(f"adapter {name!r}: layer {layer} {module} needs lora_A [{r}, in] and lora_B [out, {r}]")
        weights[layer, module] = (ab["A"], ab["B"] * scale)
    digest = xxhash.xxh64_hexdigest(data + json.dumps(config, sort_keys=True).encode())
    return Adapter(name, str(folder), r, weights, root_hash(model_name, f"{name}\x00{digest}"))


class LoraSlots:
    """The device slots: stacked A and B per layer and group, and the step's mask of each token's slot (set_step)."""

    def __init__(self, model: torch.nn.Module, num_slots: int, max_rank: int,
                 read: Callable[[str, str], Adapter], share: bool = False):
        """read(name, folder): an adapter read for this rank; share: the slots refilled are recorded for the
        other ranks (take_placed)."""
        self.model = model
        self.num_slots, self.max_rank = num_slots, max_rank
        self.read, self.share = read, share
        self.placed: list[tuple[int, str, str]] = []  # (slot, name, folder) refilled since the last step
        self.held: dict[int, Adapter] = {}  # a following rank's: what each slot holds
        param = next(model.parameters())
        self.a: dict[tuple[int, str], torch.Tensor] = {}  # [slots, k*R, in]
        self.b: dict[tuple[int, str], torch.Tensor] = {}  # [out, slots, k*R]
        self.dense = set()  # layers whose MLP is dense (an adapter may target it)
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            shapes = {"qkv": attn.qkv_proj.weight.shape, "o": attn.o_proj.weight.shape}
            if isinstance(layer.mlp, MLP):
                self.dense.add(i)
                shapes |= {"gate_up": layer.mlp.gate_up_proj.weight.shape, "down": layer.mlp.down_proj.weight.shape}
            for group, (out, inp) in shapes.items():
                k = GROUP_SIZE[group] * max_rank
                self.a[i, group] = torch.zeros(num_slots, k, inp, dtype=param.dtype, device=param.device)
                self.b[i, group] = torch.zeros(out, num_slots, k, dtype=param.dtype, device=param.device)
            attn.lora = LayerLora(self, i, "qkv", "o")
            if i in self.dense:
                layer.mlp.lora = LayerLora(self, i, "gate_up", "down")
        self.mask: torch.Tensor | None = None  # this step: [tokens, slots, 1], a token's own slot 1 (None: none)

    def _parts(self, adapter: Adapter):
        """Each of the adapter's (layer, group, A rows slice, A source, B destination rows, B source), checked
        against the model's shapes; this rank's slices."""
        r, big = adapter.rank, self.max_rank
        for (layer, module), (a, b) in adapter.weights.items():
            group, j = TARGETS[module]
            if group in ("gate_up", "down") and layer not in self.dense:
                raise RequestError(f"adapter {adapter.name!r} targets layer {layer}'s {module}, a sparse MoE layer")
            part = "self_attn" if group in ("qkv", "o") else "mlp"
            _, dst, src, full = self.model._placement(f"layers.{layer}.{part}.{module}.weight")
            out, inp = self.b[layer, group].shape[0], self.a[layer, group].shape[2]
            rows = slice(j * big, j * big + r)
            if group in ROW_PARALLEL:  # the input is this rank's slice: A's columns too
                fits = a.shape[1] == full[1] and b.shape[0] == out
                parts = (layer, group, rows, a[:, src[1]], slice(None), b)
            else:  # the output is this rank's slice: B's rows too
                fits = b.shape[0] == full[0] and a.shape[1] == inp
                parts = (layer, group, rows, a, dst[0], b[src[0]])
            if not fits:
                raise RequestError(f"adapter {adapter.name!r}: layer {layer} {module} (A {tuple(a.shape)}, B "
                                   f"{tuple(b.shape)}) does not fit this model")
            yield parts

    def check(self, adapter: Adapter) -> None:
        for _ in self._parts(adapter):
            pass

    @torch.no_grad()
    def place(self, adapter: Adapter, slot: int) -> None:
        """Copy an adapter's weights (this rank's slices) into a slot, replacing what it held."""
        for a in self.a.values():
            a[slot].zero_()
        for b in self.b.values():
            b[:, slot].zero_()
        for layer, group, rows, a, dst, b in self._parts(adapter):
            self.a[layer, group][slot, rows].copy_(a)
            self.b[layer, group][dst, slot, rows].copy_(b)
        if self.share:
            self.placed.append((slot, adapter.name, adapter.path))

    def take_placed(self) -> list[tuple[int, str, str]] | None:
        """The slots refilled since the last step (rank 0 of a parallel worker: sent with the step's input)."""
        placed, self.placed = self.placed, []
        return placed or None

    def follow(self, placed: list[tuple[int, str, str]]) -> None:
        """A following rank refills its slots as rank 0 did (reading its slices of each adapter)."""
        for slot, name, path in placed:
            held = self.held.get(slot)
            if held is None or (held.name, held.path) != (name, path):
                held = next((a for a in self.held.values() if (a.name, a.path) == (name, path)), None)
                self.held[slot] = held or self.read(name, path)
            self.place(self.held[slot], slot)

    def set_step(self, slots: np.ndarray | None, lens: np.ndarray) -> None:
        """The step's requests' slots (-1: none) and token counts: the mask of each token's own slot."""
        if slots is None:
            self.mask = None
            return
        per_token = np.repeat(slots, lens)
        mask = np.zeros((len(per_token), self.num_slots, 1), dtype=np.float32)
        has = per_token >= 0
        mask[np.flatnonzero(has), per_token[has], 0] = 1.0
        a = self.a[0, "qkv"]
        self.mask = torch.from_numpy(mask).to(device=a.device, dtype=a.dtype, non_blocking=True)

    def add(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base projection of x) with each token's adapter's delta added."""
        a, b = self.a[layer, group], self.b[layer, group]
        t, s = x.shape[0], self.num_slots
        xa = (x @ a.view(-1, a.shape[2]).T).view(t, s, -1) * self.mask  # every slot's A; the token's own kept
        return y.addmm_(xa.view(t, -1), b.view(b.shape[0], -1).T)


class LayerLora:
    """A layer's view of the slots, for one module's two projection groups (attention's, or the MLP's)."""

    __slots__ = ("slots", "layer", "first", "second")

    def __init__(self, slots: LoraSlots, layer: int, first: str, second: str):
        self.slots, self.layer, self.first, self.second = slots, layer, first, second

    @property
    def active(self) -> bool:
        """The step has tokens of an adapter."""
        return self.slots.mask is not None

    def add_first(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.slots.mask is None else self.slots.add(self.layer, self.first, x, y)

    def add_second(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.slots.mask is None else self.slots.add(self.layer, self.second, x, y)


class Adapters:
    """The adapters a worker serves: registered by name (a folder), their host copies (an LRU of
    `max_cpu_loras`), and the device slots, each held while admitted requests use it."""

    def __init__(self, model: torch.nn.Module, model_name: str, max_loras: int, max_rank: int, max_cpu_loras: int,
                 share: bool = False):
        """share: a parallel worker's rank 0 (the slots it refills go to the other ranks)."""
        self.model_name, self.max_rank, self.max_cpu_loras = model_name, max_rank, max(max_cpu_loras, max_loras)
        self.num_layers = len(model.layers)
        self.slots = LoraSlots(model, max_loras, max_rank, self._read, share)
        self.paths: dict[str, Path] = {}
        self.roots: dict[str, int] = {}  # each registered adapter's block hash root (routers hash with it)
        self.host: OrderedDict[str, Adapter] = OrderedDict()
        self.resident: list[Adapter | None] = [None] * max_loras  # what each slot holds
        self.refs = [0] * max_loras  # admitted requests using each slot
        self.used = [0] * max_loras  # when each slot was last acquired (for LRU reuse)
        self._clock = 0

    def load(self, name: str, path: str | Path) -> Adapter:
        """Register an adapter (read now, so a bad one is refused at once); a name already served is replaced."""
        if not name or ":" in name:
            raise RequestError(f"adapter name {name!r} must be non-empty, without ':'")
        adapter = self._read(name, path)
        self.slots.check(adapter)
        self.paths[name], self.roots[name] = Path(path), adapter.root
        self._cache(adapter)
        return adapter

    def unload(self, name: str) -> None:
        """New requests may no longer name it; requests already queued or running finish with it."""
        if self.paths.pop(name, None) is None:
            raise RequestError(f"no adapter {name!r}")
        del self.roots[name]
        self.host.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self.paths)

    def get(self, name: str) -> Adapter:
        """The adapter a new request names (read again if its host copy was dropped)."""
        adapter = self.host.get(name)
        if adapter is not None:
            self.host.move_to_end(name)
            return adapter
        if name not in self.paths:
            raise RequestError(f"no adapter {name!r} on this worker (loaded: {', '.join(self.names()) or 'none'})")
        adapter = self._read(name, self.paths[name])
        self.slots.check(adapter)  # (its folder may have changed since it was loaded)
        self._cache(adapter)
        return adapter

    def _read(self, name: str, path: str | Path) -> Adapter:
        return read_adapter(path, name, self.model_name, self.num_layers, self.max_rank)

    def _cache(self, adapter: Adapter) -> None:
        self.host[adapter.name] = adapter
        self.host.move_to_end(adapter.name)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

    def acquire(self, adapter: Adapter) -> int | None:
        """A slot holding the adapter for an admitted request: where it is already, else the least recently
        used slot no admitted request holds (its weights copied in); None while every slot is held."""
        self._clock += 1
        slot = next((s for s, a in enumerate(self.resident) if a is adapter), None)
        if slot is None:
            free = [s for s in range(len(self.refs)) if self.refs[s] == 0]
            if not free:
                return None
            slot = min(free, key=self.used.__getitem__)
            self.slots.place(adapter, slot)
            self.resident[slot] = adapter
        self.refs[slot] += 1
        self.used[slot] = self._clock
        return slot

    def release(self, slot: int) -> None:
        self.refs[slot] -= 1

    def forget(self, slot: int) -> None:
        """The slot holds nothing any more (an unused one: the next acquire refills it; bench.lora's loads)."""
        if self.refs[slot]:
            raise ValueError(f"slot {slot} is held by {self.refs[slot]} admitted requests")
        self.resident[slot] = None
