"""One worker's configuration, validated once: its engine's (EngineConfig, not re-declared here) and what the
worker adds around the engine: its role, address, KV transport and parallel shape."""

from dataclasses import dataclass, field

from engine.config import EngineConfig


def parse_loras(entries: list[str], max_loras: int) -> tuple[tuple[str, str], ...]:
    """--lora NAME=PATH entries as (name, folder) pairs; ValueError saying what is wrong with them."""
    loras = tuple(tuple(x.split("=", 1)) for x in entries)
    if any(len(x) != 2 or not x[0] or not x[1] for x in loras):
        raise ValueError("--lora takes NAME=PATH")
    if loras and not max_loras:
        raise ValueError("--lora needs --max-loras (how many adapters may run in one batch)")
    return loras


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    role: str  # "prefill" | "decode"
    name: str
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 0
    transport: str = "host"  # host (same host: shared memory on CPU, CUDA IPC on GPU) | nixl
    transfer_timeout_s: float = 30.0
    tp_size: int = 1  # tensor-parallel ranks (one Ray actor each, see worker/ray_group.py)
    ep_size: int = 1  # expert-parallel groups of tp_size ranks: tp_size x ep_size ranks in all
    collective_timeout_s: float = 120.0  # one collective between the ranks inside a step
    drain_timeout_s: float = 5.0  # on shutdown, requests in flight may finish this long
    log_level: str = "warning"
    # Callers of the internal API must hold it; None: open (tests, one host). Never printed (repr=False).
    internal_token: str | None = field(default=None, repr=False)
    otlp_endpoint: str | None = None  # OpenTelemetry traces to this OTLP/HTTP collector (protocol/tracing.py)
    trace_ratio: float = 1.0  # (a worker traces what the router traced: the ratio is the router's decision)
    loras: tuple[tuple[str, str], ...] = ()  # LoRA adapters served from the start: (name, folder)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {self.role!r}")
        if self.transport not in ("host", "nixl"):
            raise ValueError(f"unknown transport {self.transport!r}")
        if self.transfer_timeout_s <= 0:
            raise ValueError("transfer_timeout_s must be positive")
        if self.tp_size < 1 or self.ep_size < 1:
            raise ValueError(f"tp_size and ep_size must be >= 1, got {self.tp_size}, {self.ep_size}")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.ep_size
