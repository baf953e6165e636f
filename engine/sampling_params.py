"""Per-request sampling parameters, validated once when the request arrives."""

from dataclasses import dataclass, field

from engine.errors import RequestError

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # as OpenAI


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and k top alternatives
    # None: none; k: each prompt token's logprob (after the first) and k top alternatives, computed at prefill
    # without the prefix cache (completions' echo with logprobs)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    min_tokens: int = field(default=0)
    # (kind, source): the output follows this grammar (protocol/grammar.py; engine/guided.py)
    grammar: tuple[str, str] | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit, in [-100, 100])
    # Scheduling: waiting requests are admitted lowest priority value first (as vLLM's `priority`); among
    # equals, the tenant (an API key) served the fewest tokens first (engine/scheduler.py)
    priority: int = 0
    tenant: str = ""
    adapter: str | None = None  # the LoRA adapter's name (engine/lora.py); None: the base model

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be between -2 and 2"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
             f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (len(self.stop) <= 4, "at most 4 stop sequences"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens must be between 0 and max_tokens"),
            (all(-100.0 <= b <= 100.0 for _, b in self.logit_bias), "logit_bias values must be in [-100, 100]"),
            (len(self.logit_bias) <= MAX_LOGIT_BIAS, f"at most {MAX_LOGIT_BIAS} logit_bias entries"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing else to compute: no penalties, no logprobs, no logit bias."""
        return self.temperature == 0.0 and self.logprobs is None and not self.uses_penalties and not self.logit_bias

    @property
    def uses_penalties(self) -> bool:
        """Sampling reads the request's earlier outputs (presence, frequency or repetition penalty)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
