"""What the engine reports for a request after each step."""

from dataclasses import dataclass, field

from engine.request import FinishReason


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely alternatives, best first


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # SamplingParams.prompt_logprobs: the prompt's tokens after the first, with the request's first token
    prompt_logprobs: list[TokenLogprob] | None = None
    queued_s: float | None = None  # with its first output after its first step: seconds it waited for it


@dataclass(slots=True)
class Completion:
    """A whole generation, gathered from a request's outputs."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob] | None = None
