"""OpenAI request bodies, strictly typed; loramux's extensions are `adapters`, `router` and a few sampling knobs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictFloat | StrictInt


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompositeFields(Strict):
    """Options of a composite expert: MoLE/MoR `mask` (members to drop) and `top_k`; MoRE `task`;
    `per_layer` adds the mean gate of every decoder layer to the response."""

    mask: list[StrictStr] | None = None
    top_k: StrictInt | None = Field(None, ge=0)
    task: StrictStr | None = None
    per_layer: StrictBool = False

    def options(self) -> dict:
        return self.model_dump(exclude_none=True, exclude_defaults=True)


class AdapterRef(CompositeFields):
    name: StrictStr
    weight: Number = 1.0
    rank_lo: StrictInt = Field(0, ge=0)
    rank_hi: StrictInt | None = Field(None, ge=1)


class RouterOptions(Strict):
    """Per-request routing settings; unset fields take the server's --router-* defaults."""

    strategy: Literal["select", "mixture", "fusion"] | None = None
    top_k: StrictInt | None = Field(None, ge=1, le=16)
    temperature: Number | None = Field(None, gt=0)
    threshold: Number | None = Field(None, ge=-1, le=1)


class StreamOptions(Strict):
    include_usage: StrictBool = False


class SamplingFields(Strict):
    """Fields shared by completions and chat completions."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    user: StrictStr | None = None
    # Extensions, as in vLLM.
    top_k: StrictInt = Field(0, ge=0)
    min_p: Number = Field(0.0, ge=0, le=1)
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    adapters: list[StrictStr | AdapterRef] | None = None
    composite: CompositeFields | None = None  # options when `model` names a composite expert
    router: RouterOptions | None = None


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictInt]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    suffix: StrictStr | None = None


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[dict] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)


class LoadAdapterRequest(Strict):
    name: StrictStr
    path: StrictStr
    description: StrictStr = ""
    examples: list[StrictStr] = Field(default_factory=list)
    replace: StrictBool = False
