"""Model runner, paged KV cache, scheduler, sampler and the step loop."""

from loramux.engine.engine import Engine, RequestError, RequestOutput
from loramux.engine.sequence import SamplingParams

__all__ = ["Engine", "RequestError", "RequestOutput", "SamplingParams"]
