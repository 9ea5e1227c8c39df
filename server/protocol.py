"""OpenAI request bodies (pydantic), with vLLM's sampling extensions.

The API never pretends: a field the server does not know is a 400 naming it, as OpenAI answers
("Unrecognized request argument supplied"), and a known field the server does not implement is
accepted only at a value that asks for nothing (`functions: null`, `store: false`,
`use_beam_search: false`, `best_of` equal to `n`, ...), else a 400 naming it: each protocol
module keeps one table of them (`Unimplemented` entries, checked by one validator). `null` stands for
the default wherever a field has one. Ranges that pydantic can check are declared here; the
rest is checked by SamplingParams, and both become 400 errors naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from server.protocol_base import FastList, StrictModel, Unimplemented, at_most, refusals, refuse

MAX_N = 64
MAX_PROMPTS = 2048  # prompts in one completions request, as OpenAI allows
MAX_LOGIT_BIAS = 300  # entries of logit_bias, as OpenAI allows
MAX_STOP_TOKEN_IDS = 256


SESSION_ID_PATTERN = r"^[A-Za-z0-9._:/+=-]{1,256}$"
CACHE_SALT_MAX_CHARS = 256


# The fields of completions and chat that the server does not implement.
SAMPLING_UNIMPLEMENTED = {
    "use_beam_search": Unimplemented("beam search is not supported", (False,)),
    "priority": Unimplemented("priority is not supported: requests are served first come, first served", (0,)),
    "store": Unimplemented("store is not supported: completions are not stored", (False,)),
    "metadata": Unimplemented("metadata is only kept with store, which is not supported", empty=True),
    "service_tier": Unimplemented("service_tier must be auto or default", ("auto", "default")),
}

# Chat's: the deprecated spelling of tools, and fields for models other than this one.
CHAT_UNIMPLEMENTED = {
    "functions": Unimplemented("functions is deprecated and not supported: use tools", empty=True),
    "function_call": Unimplemented("function_call is deprecated and not supported: use tool_choice", ("none",)),
    "modalities": Unimplemented('this model writes text only: modalities can only be ["text"]', (["text"],)),
    "audio": Unimplemented("this model writes text only: audio output is not supported"),
    "reasoning_effort": Unimplemented("reasoning_effort is not supported: this model does not reason before it "
                                      "answers"),
    "prediction": Unimplemented("prediction (predicted outputs) is not supported"),
    "web_search_options": Unimplemented("web_search_options is not supported: this server does not search the web"),
    "verbosity": Unimplemented("verbosity is not supported: a reply's length is bounded by max_tokens"),
}


MAX_TOOLS = 128  # as OpenAI allows
MAX_CHOICES = 1024  # structured_outputs.choice: past llguidance's 2,000 items a row, with room
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class JSONSchemaFormat(StrictModel):
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME_PATTERN)] = "response"
    description: StrictStr | None = None
    # "schema" shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | StrictBool = Field(default=True, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(StrictModel):
    """OpenAI's response_format: text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only with it')
        return self


class StructuredOutputs(StrictModel):
    """vLLM's structured_outputs extension: exactly one of its constraints."""

    json_: dict[str, Any] | StrictStr | None = Field(default=None, alias="json")  # a schema (or its text)
    regex: StrictStr | None = None
    choice: FastList(StrictStr, min_length=1, max_length=MAX_CHOICES) | None = None
    grammar: StrictStr | None = None  # Lark, or GBNF (llama.cpp's)
    json_object: StrictBool | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in ("json_", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class StreamOptions(StrictModel):
    include_usage: StrictBool = False
    # vLLM's extension: the usage so far in every chunk.
    continuous_usage_stats: StrictBool = False


class SamplingFields(StrictModel):
    """Fields shared by completions and chat completions."""

    model: StrictStr | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    user: StrictStr | None = None
    # token id (a string in JSON) -> a bias in [-100, 100] added to its logit
    logit_bias: dict[StrictStr, StrictInt | StrictFloat] | None = None
    # Accepted at the value that asks for nothing (see the module's docstring).
    best_of: StrictInt | None = None
    use_beam_search: StrictBool | None = None
    priority: StrictInt | None = None
    store: StrictBool | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    service_tier: StrictStr | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM extensions
    top_k: StrictInt | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    ignore_eos: StrictBool = False
    stop_token_ids: FastList(StrictInt, max_length=MAX_STOP_TOKEN_IDS) | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    # sinkserve extensions: StreamingLLM cache policy (null: the server's), and long sessions
    attention_sinks: Annotated[StrictInt, Field(ge=0)] | None = None
    attention_window: Annotated[StrictInt, Field(ge=0)] | None = None
    session_id: Annotated[StrictStr, Field(pattern=SESSION_ID_PATTERN)] | None = None
    # vLLM's prefix-cache isolation: requests share cached blocks only with the same salt.
    cache_salt: Annotated[StrictStr, Field(min_length=1, max_length=CACHE_SALT_MAX_CHARS)] | None = None
    # Seconds from arrival after which the request ends with finish_reason "length" and
    # stop_reason "timeout" (null: the server's --request-timeout).
    request_timeout: Annotated[float, Field(gt=0.0, le=86400.0)] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is not None and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        value = at_most(value, MAX_LOGIT_BIAS, f"at most {MAX_LOGIT_BIAS} entries")
        return value and {_token_id(key): _bias(amount) for key, amount in value.items()}

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value, info):
        return refuse(value, info.data.get("n", 1), "best_of must equal n: no candidates are ranked")

    _unimplemented = refusals(SAMPLING_UNIMPLEMENTED)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value):
        # vLLM spells "no limit" as -1 or 0.
        if value is not None and value < -1:
            raise ValueError("top_k must be -1 (no limit) or at least 1")
        return None if value in (-1, 0) else value


def _token_id(key: str) -> int:
    if not key.lstrip("-").isdigit():
        raise ValueError(f"keys must be token ids, got {key!r}")
    return int(key)


def _bias(amount: float) -> float:
    if not -100 <= amount <= 100:
        raise ValueError(f"biases must be in [-100, 100], got {amount}")
    return float(amount)


class CompletionRequest(SamplingFields):
    _null_means_something = frozenset({"max_tokens"})  # null: as long as the context allows

    prompt: StrictStr | FastList(StrictStr) | FastList(StrictInt) | FastList(FastList(StrictInt))
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    # vLLM's extension: logprobs of the prompt tokens (the same as echo with logprobs, without echo)
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _few_enough(cls, value):
        # Before the union is validated, so that a huge list is refused at once: a list longer
        # than MAX_PROMPTS may only be one prompt of token ids.
        if isinstance(value, list) and len(value) > MAX_PROMPTS and not all(type(x) is int for x in value):
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(value)}")
        return value

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("token id prompts must not be empty")
        return value


class TextPart(StrictModel):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(StrictModel):
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCall(StrictModel):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: FastList(ToolCall, max_length=MAX_TOOLS) | None = None  # an assistant's calls
    tool_call_id: StrictStr | None = None  # the call a tool message answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value):
        """A part that is not text (an image, audio, a file) is named, before the union's errors
        would say only that a string was expected."""
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"this model takes text only: a content part of type {kind[:64]!r} cannot be "
                                     "read (send text, or parts of type 'text')")
        return value

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(StrictModel):
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: StrictBool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: StrictStr


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    # vLLM's extension: logprobs of the rendered prompt's tokens
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    add_generation_prompt: StrictBool = True
    tools: FastList(Tool, max_length=MAX_TOOLS) | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    # Accepted at the values that ask for nothing (CHAT_UNIMPLEMENTED).
    functions: list | None = None
    function_call: StrictStr | dict | None = None
    modalities: list[StrictStr] | None = None
    audio: dict | None = None
    reasoning_effort: StrictStr | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None
    verbosity: StrictStr | None = None

    _unimplemented_chat = refusals(CHAT_UNIMPLEMENTED)

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value):
        if value and len({tool.function.name for tool in value}) != len(value):
            raise ValueError("tools must have distinct names")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(cls, value, info):
        tools = info.data.get("tools")
        if value not in (None, "none") and not tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names {value.function.name!r}, which is not one of the tools")
        return value


class TokenizeRequest(StrictModel):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    # With messages: the tools as a chat request's, rendered into the prompt the same way.
    tools: FastList(Tool, max_length=MAX_TOOLS) | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(StrictModel):
    model: StrictStr | None = None
    tokens: FastList(StrictInt)
