"""The engine in one process: load a model, take requests, step the continuous batch, report outputs."""

import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from engine import fp8
from engine.attention.backend import AttentionBackend
from engine.attention.torch_backend import TorchAttention
from engine.block_pool import BlockPool
from engine.config import EngineConfig
from engine.detokenizer import Detokenizer
from engine.errors import KVCacheFullError, ModelLoadError, RequestError, UnsupportedModelError
from engine.guided import Grammars
from engine.kv_cache import KVAllocator, KVCache, KVLayout
from engine.kv_cache_manager import KVCacheManager
from engine.kv_tiers import DiskTier, HostTier
from engine.lora import Adapters
from engine.model import CausalLM
from engine.model_config import ModelConfig
from engine.model_runner import PLACEHOLDER, Forward, ModelRunner, PrevTokens
from engine.outputs import Completion, RequestOutput, TokenLogprob
from engine.parallel import SINGLE, Parallel
from engine.request import FinishReason, Request
from engine.sampler import HostSamples
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from engine.tokenizer_files import load_tokenizer
from engine.weight_loader import open_model
from protocol.block_hash import root_hash
from protocol.kv_events import KVEvent, KVEventKind
from protocol.tokenizer import ChatTokenizer

log = logging.getLogger("pdserve.engine")
CPU_DEFAULT_KV_BYTES = 512 << 20


@dataclass(slots=True)
class EngineStats:
    num_steps: int = 0
    num_tokens_computed: int = 0  # tokens run through the model (prompt chunks, recomputes and decodes)
    num_prompt_tokens: int = 0  # prompt tokens of the requests added (the prefix-cache hit ratio's denominator)
    num_preemptions: int = 0
    num_overlapped_steps: int = 0  # steps queued before the host had read the previous step's tokens


@dataclass(slots=True)
class _Launched:
    """A step queued on the device: its batch, the requests it samples (row order), where each one's
    placeholder sits in its outputs, and its samples on their way to the host / still on the device. A step
    whose samples follow grammars has its forward queued first and its sampling once their masks are filled
    (`pending`, `masks`): in the next step() call, so the device runs the forward while the host reads the
    step before, fills the masks and schedules the step after."""

    batch: ScheduledBatch
    reqs: list[Request]
    slots: list[int]
    samples: HostSamples | None = None
    tokens: PrevTokens | None = None
    # Requests that ended while this step was queued and that it computes a token for: their blocks go back
    # to the pool once it is read (no other process's KV transfer may land in a block it still writes).
    free_after: list[Request] = field(default_factory=list)
    pending: Forward | None = None  # the forward, while its sampling is not queued
    masks: tuple | None = None  # its grammar masks being filled (Grammars.start_masks), while pending


def resolve_device(name: str) -> torch.device:
    """'auto' is cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: ChatTokenizer | None = None,
                 kv_allocator: KVAllocator | None = None, parallel: Parallel = SINGLE):
        """With a Parallel of several ranks, every rank builds an engine over its shard of the model and KV;
        rank 0's schedules and samples, the others run runner.follow()."""
        self.config = config
        self.parallel = parallel
        self.device = resolve_device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        warm = self._start_fused_kernel_builds()
        if config.load_format == "dummy":
            model_cfg, weights = ModelConfig.from_hf_dir(config.model), None
        else:
            model_cfg, weights = open_model(config.model)
        self.model_config = model_cfg
        self.max_model_len = min(config.max_model_len or model_cfg.max_position_embeddings,
                                 model_cfg.max_position_embeddings)
        with torch.device("meta"):
            model = CausalLM(model_cfg, self.max_model_len, parallel)
        model = model.to_empty(device=self.device)
        if weights is None:
            model.init_dummy_weights(config.seed)
        else:
            model.load_weights(weights)
        model = model.to(self.dtype)
        if config.quantization == "fp8" or (config.quantization == "auto" and model_cfg.quantization == "fp8"
                                            and self.device.type == "cuda"):
            fp8.check_device(self.device)
            log.info("FP8 linears: %d (e4m3, a scale a row; inputs quantized per token)", fp8.quantize_linears(model))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the bf16 weights' memory back, before the KV pool is sized
        with torch.device(self.device):  # rope tables stay float32 (computed as transformers does)
            model.rotary = type(model.rotary)(model_cfg.head_dim, self.max_model_len, model_cfg.rope_theta,
                                              model_cfg.rope_scaling)
        self.model = model.eval()
        if tokenizer is None and parallel.is_driver:
            tokenizer = self._try_tokenizer()
        self.tokenizer = tokenizer
        self.eos_token_ids = set(model_cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.grammars: Grammars | None = None  # structured outputs: rank 0's, with a tokenizer
        if self.tokenizer is not None and parallel.is_driver:
            self.grammars = Grammars(self.tokenizer.tokenizer.to_str(), model_cfg.vocab_size,
                                     sorted(self.eos_token_ids), config.max_num_seqs, self.device)

        self.adapters = self._adapters()  # (their device slots before the KV pool takes the free memory)
        self.kv_layout = self._kv_layout()
        self.kv_cache = KVCache(self.kv_layout, self.device, kv_allocator)
        self.root_hash = root_hash(config.model_name)
        self.host_tier = self._host_tier()  # blocks evicted from the pool, in host memory, then on disk
        self.block_pool = BlockPool(self.kv_layout.num_blocks, config.enable_prefix_caching,
                                    evict_to=self.host_tier.offload if self.host_tier is not None else None)
        held = tuple(self.host_tier.below.held()) if self.host_tier and self.host_tier.below else ()
        if held:
            # A restart on the same disk tier: what it kept is this worker's too, in a lower tier (the routers
            # learn it now: held, then moved down).
            self.block_pool.events += [KVEvent(KVEventKind.STORED, held), KVEvent(KVEventKind.OFFLOADED, held)]
        self.kv_manager = KVCacheManager(self.block_pool, config.block_size, self.root_hash, self.host_tier)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len), self.kv_manager,
            self.adapters)
        self.attention = self._attention_backend()
        if warm is not None and hasattr(self.attention, "decode"):
            error = warm.wait()
            if error is None:
                self.model.use_fused_kernels()
            else:
                log.warning("FlashInfer's fused kernels did not build (%s); using PyTorch ops", error)
        graphs = None
        # Expert parallelism's decode steps exchange fixed-size buffers (no host sync, see engine/moe.py), so
        # their NCCL all-to-alls are captured too (config.ep_cuda_graphs, on: 13-27 ms a step on two H200s for
        # Qwen3-30B-A3B's shapes, against 92-127 ms eagerly).
        if (self.device.type == "cuda" and not config.enforce_eager and hasattr(self.attention, "decode")
                and (parallel.ep_size == 1 or config.ep_cuda_graphs)):
            from engine.cuda_graphs import CudaGraphDecoder

            graphs = CudaGraphDecoder(self.model, self.attention, config.max_num_seqs,
                                      -(-self.max_model_len // config.block_size))
        self._overlap = config.async_scheduling
        self.runner = ModelRunner(self.model, self.attention, config.block_size, self.device, graphs, parallel,
                                  self._overlap, self.adapters.slots if self.adapters is not None else None)
        self._inflight: _Launched | None = None  # a step queued on the device whose tokens are not read yet
        self._ready: list[RequestOutput] = []  # outputs read early (by drain), returned by the next step
        self.stats = EngineStats()
        self._detok: dict[str, Detokenizer] = {}
        self._arrivals = itertools.count()

    def _start_fused_kernel_builds(self):
        """Start building engine/fused.py's kernels (FlashInfer JIT) while the weights load; None when they are
        not going to be used."""
        cfg = self.config
        if (self.device.type != "cuda" or not cfg.fused_kernels or cfg.attention_backend == "torch"
                or self.dtype not in (torch.bfloat16, torch.float16)):
            return None
        try:
            from engine import fused

            return fused.warm_up()
        except ImportError:
            return None

    def _try_tokenizer(self) -> ChatTokenizer | None:
        try:
            return load_tokenizer(self.config.model)
        except ModelLoadError as e:
            log.warning("no tokenizer (%s): outputs carry token ids only, stop strings are ignored", e)
            return None

    def _host_tier(self) -> HostTier | None:
        cfg, lay = self.config, self.kv_layout
        if not (cfg.kv_host_bytes and cfg.enable_prefix_caching):
            return None
        disk = None
        if cfg.kv_disk_dir and cfg.kv_disk_bytes:
            # Blocks on disk are this model's, these weights' and this layout's only (a restart may reuse them).
            weights = Path(cfg.model)
            files = [weights] if weights.is_file() else sorted(weights.glob("*.safetensors")) + [weights / "config.json"]
            stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
            tag = xxhash.xxh64_intdigest(repr((self.root_hash, str(weights.resolve()), stats, cfg.load_format,
                                               cfg.seed, cfg.quantization, lay, self.model.heads.kv_start)).encode())
            disk = DiskTier(Path(cfg.kv_disk_dir) / f"rank{self.parallel.rank}", cfg.kv_disk_bytes // lay.block_bytes,
                            lay.block_bytes, tag)
        return HostTier(max(1, cfg.kv_host_bytes // lay.block_bytes), self.kv_cache.tensor, disk)

    def _adapters(self) -> Adapters | None:
        cfg = self.config
        if not cfg.max_loras:
            return None
        return Adapters(self.model, cfg.model_name, cfg.max_loras, cfg.max_lora_rank, cfg.max_cpu_loras,
                        share=self.parallel.world_size > 1 and self.parallel.is_driver)

    def _kv_layout(self) -> KVLayout:
        """This rank's pool: its KV heads only; with several ranks, as many blocks as the smallest one holds."""
        cfg, mc = self.config, self.model_config
        kv_heads = self.model.heads.num_kv_heads
        dtype = "float8_e4m3fn" if cfg.kv_cache_dtype == "fp8" else str(self.dtype).removeprefix("torch.")
        probe = KVLayout(1, mc.num_layers, cfg.block_size, kv_heads, mc.head_dim, dtype)
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * cfg.gpu_memory_utilization) - (total - free)
        else:
            budget = CPU_DEFAULT_KV_BYTES
        num_blocks = budget // probe.block_bytes
        if self.parallel.world_size > 1:
            num_blocks = self.parallel.min_over_ranks(num_blocks)
        if num_blocks < 1:
            raise ModelLoadError(f"KV budget of {budget} bytes holds no block of {probe.block_bytes} bytes")
        layout = KVLayout(num_blocks, mc.num_layers, cfg.block_size, kv_heads, mc.head_dim, probe.dtype)
        log.info("KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%s, %s)", num_blocks, cfg.block_size,
                 num_blocks * cfg.block_size, num_blocks * probe.block_bytes / 2**20, layout.dtype, self.device)
        return layout

    def _attention_backend(self) -> AttentionBackend:
        name, windows = self.config.attention_backend, self.model_config.attention_windows()
        if name == "flashinfer" or (name == "auto" and self.device.type == "cuda"):
            try:
                from engine.attention.flashinfer_backend import FlashInferAttention

                return FlashInferAttention(self.kv_cache, self.model.heads.num_heads, self.model.heads.num_kv_heads,
                                           self.model_config.head_dim, self.dtype, windows)
            except (ImportError, UnsupportedModelError) as e:
                if name == "flashinfer":
                    raise ModelLoadError(f"FlashInfer backend unavailable: {e}") from e
                log.warning("FlashInfer unavailable (%s); using the PyTorch attention backend", e)
        return TorchAttention(self.kv_cache, self.model.heads.num_heads, self.model_config.head_dim, windows)

    # --- requests ---

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    hold_kv: bool = False, resumed: Sequence[int] = ()) -> Request:
        """Queue a request. With hold_kv, its blocks stay referenced after it ends (release_held frees them).
        resumed: outputs it already produced elsewhere (a migrated stream); they are computed with the prompt
        and generation goes on after them as if this engine had sampled them."""
        req = self._new_request(request_id, prompt_token_ids, params, resumed)
        req.hold_kv = hold_kv
        self.scheduler.add(req)
        return req

    def _new_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     resumed: Sequence[int] = ()) -> Request:
        if request_id in self.scheduler.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        num_tokens = len(prompt_token_ids) + len(resumed)
        if num_tokens >= self.max_model_len:
            raise RequestError(f"the prompt has {num_tokens} tokens; this model's context is "
                               f"{self.max_model_len} tokens, including the output")
        if len(resumed) >= params.max_tokens:
            raise RequestError(f"{len(resumed)} tokens already generated; max_tokens is {params.max_tokens}")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab or any(not 0 <= t < vocab for t in resumed):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        if not self.scheduler.fits_pool(num_tokens + 1):
            raise RequestError("the prompt does not fit in this worker's KV cache")
        if any(not 0 <= t < vocab for t, _ in params.logit_bias):
            raise RequestError(f"logit_bias token ids must be in [0, {vocab})")
        matcher = None
        if params.grammar is not None:
            if self.grammars is None:
                raise RequestError("structured outputs need the model's tokenizer, which this worker lacks")
            matcher = self.grammars.matcher(params.grammar)
            if not all(Grammars.advance(matcher, t) for t in resumed):
                raise RequestError("the tokens already generated do not follow the request's grammar")
        adapter = None
        if params.adapter is not None:
            if self.adapters is None:
                raise RequestError("this worker serves no LoRA adapters (--max-loras 0)")
            adapter = self.adapters.get(params.adapter)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        req = Request(request_id, list(prompt_token_ids), params, seed, next(self._arrivals),
                      output_token_ids=list(resumed), matcher=matcher, adapter=adapter,
                      root_hash=adapter.root if adapter is not None else None)
        self.stats.num_prompt_tokens += len(prompt_token_ids)
        if self.tokenizer is not None and self.config.detokenize:
            detok = self._detok[request_id] = Detokenizer(self.tokenizer, req.prompt_token_ids, params.stop,
                                                          params.skip_special_tokens, params.include_stop_str_in_output)
            detok.resume(resumed)
        return req

    # --- LoRA adapters ---

    def load_adapter(self, name: str, path: str) -> None:
        """Serve a PEFT LoRA adapter folder as `name` (requests name it in SamplingParams.adapter)."""
        if self.adapters is None:
            raise RequestError("this worker serves no LoRA adapters (--max-loras 0)")
        self.adapters.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """New requests may no longer name it; those queued or running finish with it."""
        if self.adapters is None:
            raise RequestError(f"no adapter {name!r}")
        self.adapters.unload(name)

    def adapter_names(self) -> list[str]:
        return self.adapters.names() if self.adapters is not None else []

    def adapter_roots(self) -> dict[str, int]:
        """Each adapter served: the root its requests' block hashes chain from."""
        return dict(self.adapters.roots) if self.adapters is not None else {}

    def release_held(self, request_id: str) -> None:
        self.drain()
        self.scheduler.release_held(request_id)

    def held_blocks(self, request_id: str) -> list[int] | None:
        req = self.scheduler.held.get(request_id)
        return None if req is None else req.block_ids

    def reserve_remote(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       resumed: Sequence[int] = ()) -> Request:
        """Reserve blocks for a prompt (and the outputs resumed after it) a prefill worker computes;
        req.num_cached_tokens are already here."""
        req = self._new_request(request_id, prompt_token_ids, params, resumed)
        if not self.scheduler.add_remote(req):
            self._detok.pop(request_id, None)
            raise KVCacheFullError(f"no room for {len(prompt_token_ids)} prompt tokens in the KV cache now")
        return req

    def start_remote(self, request_id: str, first_token: int, logprobs: list[TokenLogprob],
                     prompt_logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        """The prompt's KV is in the reserved blocks: emit the prefill's first token (and the prompt's logprobs
        it computed, if asked) and start decoding."""
        req = self.scheduler.remote.get(request_id)
        if req is None:
            raise RequestError(f"no reserved request {request_id!r}")
        req.prompt_logprobs = prompt_logprobs  # (the prefill worker's, when asked: reported with this token)
        self.scheduler.start_remote(req)
        req.output_token_ids.append(first_token)
        n = len(req.output_token_ids)
        reason = self._finish_reason(req, first_token, n)
        if reason is not None:
            self.scheduler.finish(req, reason)
        return self._output(req, [first_token], logprobs if req.params.logprobs is not None else [], n)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.drain()
        self.scheduler.release_held(request_id)
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        self._ready = [o for o in self._ready if o.request_id != request_id]  # the abort is its last word
        self.scheduler.finish(req, FinishReason.ABORT)
        return self._output(req, [], [], len(req.output_token_ids))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None or bool(self._ready)

    # --- the step ---

    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the step before it (overlapped scheduling) or of
        this one. Overlapped: step N+1 is built and queued on the device before the host reads step N's
        tokens, so the host's work hides behind the device's. Step N+1 takes N's tokens on the device
        (placeholders in the requests until read); a request that N ends has computed one token in vain."""
        outputs, self._ready = self._ready, []
        prev, self._inflight = self._inflight, None
        if prev is not None and not self._can_overlap(prev):
            outputs += self._finish(prev)
            prev = None
        batch = self.scheduler.schedule()
        self.stats.num_preemptions += len(batch.preempted)
        if batch.is_empty and prev is None and self.scheduler.waiting:
            self.kv_manager.wait_reads(0.01)  # nothing to run but prefixes coming back from disk
        if prev is not None:
            self._sample(prev)  # (step N+1's forward takes its tokens)
        launched = None if batch.is_empty else self._launch(batch, prev)
        if prev is not None:
            self.stats.num_overlapped_steps += launched is not None
            # Once the grammars took step N's tokens, the masks of N+1 are filled while N's outputs are made.
            start = None if launched is None or launched.pending is None else (lambda: self._start_masks(launched))
            outputs += self._finish(prev, running=launched, on_tokens=start)
        if launched is not None:
            if launched.pending is not None and launched.masks is None:
                self._start_masks(launched)  # (every earlier step is read)
            if self._overlap:
                self._inflight = launched
            else:
                outputs += self._finish(launched)
        return outputs

    def _can_overlap(self, prev: "_Launched") -> bool:
        # Penalties read a request's earlier outputs on the host when the next step's sampling is built.
        return not any(r.params.uses_penalties for r in prev.reqs)

    def _launch(self, batch: ScheduledBatch, prev: "_Launched | None") -> "_Launched":
        """Queue the step's forward, and its sampling unless a request it samples follows a grammar."""
        fwd = self.runner.launch(batch, prev.tokens if prev is not None else None)
        self.stats.num_steps += 1
        for req, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            req.num_computed_tokens += n
            self.stats.num_tokens_computed += n
        launched = _Launched(batch, fwd.reqs, [], pending=fwd)
        for req in fwd.reqs:  # the token this step samples: a placeholder until _finish reads it
            launched.slots.append(len(req.output_token_ids))
            if not req.is_finished:  # (ended by the step before, read just now: this token is computed in vain)
                req.output_token_ids.append(PLACEHOLDER)
        if self.grammars is None or not any(r.matcher is not None for r in fwd.reqs):
            self._sample(launched)
        return launched

    def _start_masks(self, step: "_Launched") -> None:
        """Start filling a pending step's grammar masks (its requests' matchers have taken every earlier token)."""
        rows = [(row, r.matcher) for row, r in enumerate(step.reqs)
                if r.matcher is not None and not r.is_finished and not r.matcher.is_stopped()]
        step.masks = self.grammars.start_masks(rows) if rows else None

    def _sample(self, step: "_Launched") -> None:
        """Queue a launched step's sampling, if it is not queued yet (with its grammar masks, once filled)."""
        if step.pending is None:
            return
        fwd, step.pending = step.pending, None
        # (a row that ended since its mask was started keeps it: its sample is not read)
        masks, step.masks = step.masks, None
        out = self.runner.sample(fwd, self.grammars.finish_masks(masks) if masks is not None else None)
        if out is not None:
            step.tokens = PrevTokens(out.token_ids, {r.request_id: row for row, r in enumerate(fwd.reqs)})
            step.samples = out.copy_to_host()

    def _finish(self, step: "_Launched", running: "_Launched | None" = None, on_tokens=None) -> list[RequestOutput]:
        """Wait for a launched step's tokens; append them, register newly full blocks, end finished requests.
        running: a step launched after this one and still queued (requests it computes keep their blocks);
        on_tokens(): called once the tokens are in their requests and their grammars took them."""
        self._sample(step)
        outputs = self._read(step, running, on_tokens)
        for req in step.free_after:
            self.kv_manager.free(req)
        return outputs

    def _read(self, step: "_Launched", running: "_Launched | None", on_tokens=None) -> list[RequestOutput]:
        # The step's one host sync (a step that samples nothing, a prefill chunk, has nothing to read).
        empty = ([], None, None, None)
        tokens, logprobs, top_ids, top_lps = step.samples.lists() if step.samples is not None else empty
        # Each grammar takes its token here, before on_tokens() may start filling masks on another thread; from
        # then on only matchers that have stopped are touched on this one.
        grammar = {}  # request id -> (its grammar took the token, the grammar has stopped)
        for req, slot, tok in zip(step.reqs, step.slots, tokens, strict=True):
            if not req.is_finished:
                req.output_token_ids[slot] = tok
                if req.matcher is not None:
                    grammar[req.request_id] = (Grammars.advance(req.matcher, tok), req.matcher.is_stopped())
        if on_tokens is not None:
            on_tokens()
        for req in step.batch.requests:  # every token in [0, num_computed_tokens) is known now
            if not req.is_finished:
                self.kv_manager.commit(req)
        outputs = []
        for row, (req, slot, tok) in enumerate(zip(step.reqs, step.slots, tokens, strict=True)):
            if req.is_finished:  # aborted, or ended by the step before (this token was computed in vain)
                continue
            n = slot + 1
            lps = []
            if req.params.logprobs is not None and logprobs is not None:
                k = req.params.logprobs
                top = tuple(zip(top_ids[row][:k], top_lps[row][:k], strict=True)) if top_ids else ()
                lps.append(TokenLogprob(tok, logprobs[row], top))
            reason = self._finish_reason(req, tok, n, grammar.get(req.request_id))
            if reason is not None:
                del req.output_token_ids[n:]  # a placeholder of a step launched after this one
                in_flight = running is not None and any(r is req for r in running.batch.requests)
                self.scheduler.finish(req, reason, running.free_after if in_flight else None)
            outputs.append(self._output(req, [tok], lps, n))
        return outputs

    def drain(self) -> None:
        """Read the launched step's results now (before a request's state changes from outside a step)."""
        if self._inflight is not None:
            step, self._inflight = self._inflight, None
            self._ready += self._finish(step)

    def _finish_reason(self, req: Request, tok: int, n: int, grammar: tuple[bool, bool] | None = None
                       ) -> FinishReason | None:
        """Why a request ends at its n-th output token tok, if it does. grammar: (its grammar took the token,
        it has stopped) when that was done already (None: the grammar takes the token here)."""
        p = req.params
        detok = self._detok.get(req.request_id)
        stopped_by_string = detok.add(tok) if detok is not None else False
        if req.matcher is not None:
            advanced, stopped = grammar or (Grammars.advance(req.matcher, tok), req.matcher.is_stopped())
            if not advanced:  # only a token sampled without its mask gets here
                log.error("request %s: its grammar refused token %d (%s)", req.request_id, tok,
                          req.matcher.get_error())
                return FinishReason.STOP
            if stopped:  # the grammar is complete: nothing may follow
                return FinishReason.STOP
        is_stop = (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids or stopped_by_string
        if is_stop and n >= p.min_tokens:
            return FinishReason.STOP
        if n >= p.max_tokens or len(req.prompt_token_ids) + n >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _output(self, req: Request, new: list[int], lps: list[TokenLogprob], n: int) -> RequestOutput:
        finished = req.is_finished
        prompt_lps = None
        if req.prompt_logprobs is not None and new:  # complete with the first token: reported once
            prompt_lps, req.prompt_logprobs = req.prompt_logprobs, None
        queued = None
        if req.queued_s is not None and not req.queue_reported:
            queued, req.queue_reported = req.queued_s, True
        detok = self._detok.pop(req.request_id, None) if finished else self._detok.get(req.request_id)
        return RequestOutput(
            request_id=req.request_id, new_token_ids=new,
            text_delta=detok.take_delta(final=finished) if detok is not None else "",
            finished=finished, finish_reason=req.finish_reason, num_prompt_tokens=len(req.prompt_token_ids),
            # (a migrated stream's cached outputs are not prompt tokens: usage never counts more cached than prompt)
            num_cached_tokens=min(req.num_cached_tokens, len(req.prompt_token_ids)), num_output_tokens=n, logprobs=lps,
            prompt_logprobs=prompt_lps, queued_s=queued,
        )

    # --- convenience ---

    def generate(self, prompts: list[list[int]] | list[str], params: SamplingParams | list[SamplingParams]
                 ) -> list[Completion]:
        """Run prompts (token ids, or text encoded with the model's tokenizer) to completion."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise RequestError("text prompts need a tokenizer; pass token ids")
                prompt = self.tokenizer.encode(prompt)
            rid = f"generate-{next(self._arrivals)}-{i}"
            self.add_request(rid, prompt, p)
            ids.append(rid)
        results = {rid: Completion(rid, [], "", None, 0, 0, []) for rid in ids}
        while self.has_unfinished():
            for o in self.step():
                c = results.get(o.request_id)
                if c is None:  # a request added by someone else
                    continue
                c.token_ids += o.new_token_ids
                c.text += o.text_delta
                c.logprobs += o.logprobs
                if o.prompt_logprobs is not None:
                    c.prompt_logprobs = o.prompt_logprobs
                c.finish_reason = o.finish_reason
                c.num_prompt_tokens, c.num_cached_tokens = o.num_prompt_tokens, o.num_cached_tokens
        return [results[rid] for rid in ids]
