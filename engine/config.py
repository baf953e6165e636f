"""The engine's one config object, validated once and passed down."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str  # a Hugging Face folder or a .gguf file
    served_model_name: str | None = None  # the name clients use, and the root of the block hash chain
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    block_size: int = 16
    kv_cache_bytes: int | None = None  # the KV pool's budget; None: 512 MiB on CPU, a share of free GPU memory
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8: e4m3 (half a bf16 pool's bytes, scale 1.0)
    kv_host_bytes: int = 0  # the host tier: pinned host memory for blocks evicted from the pool; 0: none
    kv_disk_dir: str | None = None  # the disk tier below the host tier (needs it): a directory, one file a block
    kv_disk_bytes: int = 0  # the disk tier's size
    gpu_memory_utilization: float = 0.85  # share of total GPU memory the engine may hold (weights + KV)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context length
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto | torch | flashinfer
    enforce_eager: bool = False  # True: no CUDA graphs for decode
    # Expert parallelism's decode steps in CUDA graphs too (NCCL all-to-all captured): on two H200s, Qwen3-30B-A3B's
    # shapes decode in 13-27 ms a step (batch 1-64) against 92-127 ms eagerly, with the same greedy tokens.
    ep_cuda_graphs: bool = True
    async_scheduling: bool = True  # build and queue step N+1 before reading step N's tokens
    fused_kernels: bool = True  # with the FlashInfer backend: its one-kernel norm, rotary and SwiGLU (engine/fused.py)
    # fp8: the decoder's linears in e4m3 with a scale a row, inputs quantized per token (engine/fp8.py); auto: fp8 for
    # an FP8 checkpoint on a GPU (on a CPU its weights are dequantized into dtype), else none.
    quantization: str = "auto"
    load_format: str = "auto"  # auto: read the weights; dummy: random weights of the config's shapes (benchmarks)
    # The engine turns tokens into text and ends requests at stop strings (offline use). A worker's engine core
    # leaves both to its frontend process (worker/engine_core.py), so that its loop does no per-token text work.
    detokenize: bool = True
    seed: int = 0  # for dummy weights
    # LoRA adapters (engine/lora.py): how many may run in one batch (device slots; 0: none), their largest rank,
    # and how many are kept read in host memory (at least max_loras)
    max_loras: int = 0
    max_lora_rank: int = 16
    max_cpu_loras: int = 8

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if self.attention_backend not in ("auto", "torch", "flashinfer"):
            raise ValueError(f"unknown attention backend {self.attention_backend!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r} (auto, fp8)")
        if self.quantization not in ("auto", "none", "fp8"):
            raise ValueError(f"unknown quantization {self.quantization!r} (auto, none, fp8)")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"unknown load_format {self.load_format!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes must be positive")
        if self.kv_host_bytes < 0 or self.kv_disk_bytes < 0:
            raise ValueError("kv_host_bytes and kv_disk_bytes must be >= 0")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError("max_loras must be >= 0 and max_lora_rank >= 1")
        if self.kv_disk_bytes and not (self.kv_disk_dir and self.kv_host_bytes):
            raise ValueError("a disk KV tier needs kv_disk_dir and a host tier (kv_host_bytes) above it")

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model)
        return path.stem if path.suffix.lower() == ".gguf" else path.name
