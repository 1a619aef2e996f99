"""OpenAI request bodies, strictly typed; loramux's extensions are `adapters`, `router` and a few sampling knobs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, AllowInfNan, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from pydantic import StrictStr

from loramux.engine.sequence import MAX_SEED

# JSON as Python parses it allows NaN, Infinity and 1e999 (= inf): no field takes them.
Number = Annotated[StrictFloat, AllowInfNan(False)] | StrictInt

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_ADAPTER_WEIGHT = 100.0  # beyond this a mixture only overflows the activations


def _encodable(value: str) -> str:
    """Refuse unpaired surrogates ("\\ud800" in JSON): the tokenizer cannot encode them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains an unpaired UTF-16 surrogate at position {exc.start}") from None
    return value


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


Text = Annotated[StrictStr, AfterValidator(_encodable)]
PathText = Annotated[StrictStr, AfterValidator(_encodable), AfterValidator(_no_nul)]
StopString = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_encodable)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompositeFields(Strict):
    """Options of a composite expert: MoLE/MoR `mask` (members to drop) and `top_k`; MoRE `task`;
    `per_layer` adds the mean gate of every decoder layer to the response."""

    mask: list[Text] | None = None
    top_k: StrictInt | None = Field(None, ge=0)
    task: Text | None = None
    per_layer: StrictBool = False

    def options(self) -> dict:
        return self.model_dump(exclude_none=True, exclude_defaults=True)


class AdapterRef(CompositeFields):
    name: Text
    weight: Number = Field(1.0, ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT)
    rank_lo: StrictInt = Field(0, ge=0)
    rank_hi: StrictInt | None = Field(None, ge=1)


class RouterOptions(Strict):
    """Per-request routing settings; unset fields take the server's --router-* defaults."""

    strategy: Literal["select", "mixture", "fusion", "mole", "mor", "more"] | None = None
    composite: Text | None = None  # the composite a composite strategy uses (default: the best-matching card)
    top_k: StrictInt | None = Field(None, ge=1, le=16)
    temperature: Number | None = Field(None, gt=0)
    threshold: Number | None = Field(None, ge=-1, le=1)


class StreamOptions(Strict):
    include_usage: StrictBool = False


class SamplingFields(Strict):
    """Fields shared by completions and chat completions."""

    model: Text
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    user: Text | None = None
    # Extensions, as in vLLM.
    top_k: StrictInt = Field(0, ge=0)
    min_p: Number = Field(0.0, ge=0, le=1)
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    adapters: list[Text | AdapterRef] | None = None
    composite: CompositeFields | None = None  # options when `model` names a composite expert
    router: RouterOptions | None = None


class CompletionRequest(SamplingFields):
    prompt: Text | list[StrictInt]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    suffix: Text | None = None


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[dict] | None = None  # text parts are checked by the chat route
    name: Text | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)


class LoadAdapterRequest(Strict):
    name: PathText
    path: PathText
    description: Text = ""
    examples: list[Text] = Field(default_factory=list)
    replace: StrictBool = False
