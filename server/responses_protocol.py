"""OpenAI Responses API request bodies (pydantic): POST /v1/responses.

As in server/protocol.py, the API never pretends: a field the server does not know is a 400
naming it, and a field of OpenAI's that the server does not implement (tools, reasoning, JSON
output formats, `include`, background responses, images and files in the input...) is accepted
only at the value that asks for nothing, else a 400 naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from model.tokenizers.tokenizer import replace_lone_surrogates
from server.protocol import SAMPLING_UNIMPLEMENTED
from server.protocol_base import FastList, StrictModel, Unimplemented, at_most, refuse, refusals

MAX_INPUT_ITEMS = 2048  # messages in one request's input
MAX_CONTENT_PARTS = 256  # text parts in one message
MAX_ID_CHARS = 256  # response and item ids a client sends back
MAX_METADATA_PAIRS = 16  # OpenAI's bounds on metadata
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_IDENTIFIER_CHARS = 512  # user, safety_identifier, prompt_cache_key

_TEXT_PARTS = ("input_text", "output_text")


# The fields of /v1/responses that the server does not implement (server/protocol.py, Unimplemented).
RESPONSES_UNIMPLEMENTED = {
    "tools": Unimplemented("tools are not supported yet", empty=True),
    "reasoning": Unimplemented("reasoning is not supported: the model has no reasoning mode", empty=True),
    "include": Unimplemented("include is not supported: none of its fields can be filled", empty=True),
    "background": Unimplemented("background responses are not supported", (False,)),
    "top_logprobs": Unimplemented("top_logprobs is not supported on /v1/responses yet", (0,)),
    "service_tier": SAMPLING_UNIMPLEMENTED["service_tier"],
    "prompt_cache_retention": Unimplemented('only "in_memory" (the chain\'s session cache) is supported',
                                            ("in_memory",)),
    "conversation": Unimplemented("conversations are not supported: chain responses with previous_response_id"),
    "prompt": Unimplemented("prompt templates are not supported"),
    "context_management": Unimplemented("context_management is not supported (the server's attention window "
                                        "manages long chains)", empty=True),
}


class InputTextPart(StrictModel):
    type: Literal["input_text"]
    text: StrictStr


class OutputTextPart(StrictModel):
    """Text of an earlier assistant reply, as the client got it in a response's `output`."""

    type: Literal["output_text"]
    text: StrictStr
    # What a response's output part carries besides its text: sinkserve makes no annotations,
    # and logprobs sent back describe the text only (they ask for nothing).
    annotations: list | None = None
    logprobs: list | None = None

    _unimplemented = refusals({"annotations": Unimplemented("annotations are not supported: sinkserve's output has "
                                                            "none", empty=True)})


def _check_parts(content) -> None:
    """Refuse content that is not text by name (before the union's errors would hide why)."""
    if isinstance(content, list):
        for part in content[:MAX_CONTENT_PARTS + 1]:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in _TEXT_PARTS:
                raise ValueError(f"content parts of type {kind[:64]!r} are not supported: text only "
                                 "(input_text, and output_text in assistant messages)")


def _bounded(text: str, max_chars: int, what: str) -> None:
    if len(text) > max_chars:
        raise ValueError(f"{what} are at most {max_chars} characters")


ContentPart = Annotated[InputTextPart | OutputTextPart, Field(discriminator="type")]


class InputMessage(StrictModel):
    """A message of the input: `{"role", "content"}` (OpenAI's easy input message), a
    `{"type": "message", ...}` item, or an assistant message of an earlier response's output."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | FastList(ContentPart, max_length=MAX_CONTENT_PARTS)
    id: Annotated[StrictStr, Field(max_length=MAX_ID_CHARS)] | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value):
        _check_parts(value)
        return value

    @model_validator(mode="after")
    def _parts_fit_the_role(self):
        if self.role != "assistant" and isinstance(self.content, list) and any(
                part.type == "output_text" for part in self.content):
            raise ValueError(f"output_text parts belong to assistant messages, not {self.role} messages")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseStreamOptions(StrictModel):
    include_obfuscation: StrictBool | None = None

    _unimplemented = refusals({"include_obfuscation": Unimplemented(
        "include_obfuscation is not supported: stream events carry no padding", (False,))})


class ResponseRequest(StrictModel):
    """POST /v1/responses."""

    model: StrictStr | None = None
    input: StrictStr | FastList(InputMessage, min_length=1, max_length=MAX_INPUT_ITEMS)
    instructions: StrictStr | None = None
    previous_response_id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)] | None = None
    store: StrictBool = True
    stream: StrictBool = False
    stream_options: ResponseStreamOptions | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    user: Annotated[StrictStr, Field(max_length=MAX_IDENTIFIER_CHARS)] | None = None
    safety_identifier: Annotated[StrictStr, Field(max_length=MAX_IDENTIFIER_CHARS)] | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    text: dict | None = None
    # Tools: accepted at the values that ask for none.
    tools: list | None = None
    tool_choice: StrictStr | dict | None = None
    parallel_tool_calls: StrictBool = True
    max_tool_calls: Annotated[StrictInt, Field(ge=1)] | None = None  # no tools: no calls to bound
    # Accepted at the value that asks for nothing only.
    reasoning: dict | None = None
    include: list | None = None
    background: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: Annotated[StrictStr, Field(max_length=MAX_IDENTIFIER_CHARS)] | None = None
    prompt_cache_retention: StrictStr | None = None
    conversation: Any = None
    prompt: Any = None
    context_management: list | None = None
    # sinkserve extensions: StreamingLLM cache policy (null: the server's)
    attention_sinks: Annotated[StrictInt, Field(ge=0)] | None = None
    attention_window: Annotated[StrictInt, Field(ge=0)] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _messages_only(cls, value):
        if isinstance(value, list):
            for item in value[:MAX_INPUT_ITEMS + 1]:
                kind = item.get("type", "message") if isinstance(item, dict) else None
                if isinstance(kind, str) and kind != "message":
                    raise ValueError(f"input items of type {kind[:64]!r} are not supported: messages only")
                if isinstance(item, dict):
                    _check_parts(item.get("content"))
        return value

    @model_validator(mode="after")
    def _valid_unicode(self):
        """The text this API sends back (instructions, metadata, input items) must encode as
        UTF-8: a lone surrogate becomes U+FFFD, as it does in the prompt."""
        clean = replace_lone_surrogates
        if self.instructions is not None:
            self.instructions = clean(self.instructions)
        if self.metadata:
            self.metadata = {clean(key): clean(value) for key, value in self.metadata.items()}
        if isinstance(self.input, str):
            self.input = clean(self.input)
            return self
        for message in self.input:
            if isinstance(message.content, str):
                message.content = clean(message.content)
            else:
                for part in message.content:
                    part.text = clean(part.text)
        return self

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value):
        at_most(value, MAX_METADATA_PAIRS, f"at most {MAX_METADATA_PAIRS} key-value pairs, got {{count}}")
        for key, item in (value or {}).items():
            _bounded(key, MAX_METADATA_KEY_CHARS, "keys")
            _bounded(item, MAX_METADATA_VALUE_CHARS, "values")
        return value

    @field_validator("text")
    @classmethod
    def _text_format(cls, value):
        if value is None:
            return None
        unknown = set(value) - {"format", "verbosity"}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0][:64]!r}")
        text_format = value.get("format")
        if text_format is not None and text_format != {"type": "text"}:
            raise ValueError('only format {"type": "text"} is supported (no JSON formats yet)')
        refuse(value.get("verbosity"), "medium", 'verbosity other than "medium" is not supported')
        return value

    _unimplemented = refusals(RESPONSES_UNIMPLEMENTED)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value):
        if value is not None and value not in ("none", "auto"):
            raise ValueError('only "none" and "auto" are supported: tools are not supported yet')
        return value

    def messages(self) -> list[tuple[str, str]]:
        """This request's input as (role, text) pairs."""
        if isinstance(self.input, str):
            return [("user", self.input)]
        return [(item.role, item.text()) for item in self.input]
