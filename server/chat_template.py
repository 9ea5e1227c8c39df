"""Chat messages to prompt tokens, through the model's jinja2 chat template.

The template comes from the checkpoint (`chat_template` in tokenizer_config.json,
chat_template.jinja, or a GGUF's `tokenizer.chat_template`) and is rendered as transformers'
`apply_chat_template` renders it: a jinja2 sandbox with `trim_blocks`, `lstrip_blocks` and loop
controls, the `tojson` filter, `raise_exception` and `strftime_now`, and the variables
`messages`, `add_generation_prompt`, `bos_token` and `eos_token`; `{% generation %}` blocks
render as their body. Special-token text in the
result (`<s>`, `<|im_start|>`) becomes the special token ids.

A model without a template (the bundled stories260K has none) gets the plain fallback: BOS, then
each message as `<role>: <content>` on its own line, then `assistant:` when a reply is wanted.
A past reply is `assistant:<content>`, with no space added: the reply as the model wrote it after
`assistant:`, so that a resent conversation matches the tokens of the one that was generated
(and a session reuses its whole cache).

Tools: `tools` is passed to the template as transformers passes it, and messages keep their
`tool_calls` (arguments as a dict) and `tool_call_id`. A ChatML template that ignores tools
(SmolLM2's) is replaced, for conversations with tools, by chat_templates/chatml_tools.jinja,
which teaches SmolLM2's `<tool_call>[...]</tool_call>` format; the fallback template renders
tools in the same format.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError, meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.tokenizers.tokenizer import Tokenizer

FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}system: You can call these tools: {{ tools | tojson }}. To call tools, reply with only "
    "<tool_call>[{\"name\": \"tool name\", \"arguments\": {\"argument\": \"value\"}}]</tool_call>\n{% endif %}"
    "{% for message in messages %}{{ message['role'] }}:"
    "{% if message['role'] != 'assistant' %} {% endif %}{{ message['content'] }}"
    "{% if message.get('tool_calls') %}<tool_call>["
    "{% for call in message['tool_calls'] %}{% if not loop.first %}, {% endif %}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}{% endfor %}"
    "]</tool_call>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# For a ChatML template that does not render tools (SmolLM2's): ChatML with SmolLM2's tool format.
CHATML_TOOLS_TEMPLATE = (Path(__file__).parent / "chat_templates" / "chatml_tools.jinja").read_text(encoding="utf-8")


class ChatTemplateError(ValueError):
    pass


class ToolsNotRenderedError(ChatTemplateError):
    """A conversation with tools for a template that would silently drop them."""


class _GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}`, which templates use to mark the assistant's
    tokens for training masks (transformers' AssistantTracker): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: unlike jinja2's own, no HTML escaping and non-ASCII kept as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.source = template or tokenizer.chat_template or FALLBACK_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols, _GenerationBlocks])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self.template = env.from_string(self.source)
            self.renders_tools = "tools" in meta.find_undeclared_variables(env.parse(self.source))
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from None
        # A ChatML template that ignores tools gets sinkserve's own when a conversation has
        # tools; any other template that ignores them cannot take them (None).
        self.tool_template = self.template if self.renders_tools else None
        if not self.renders_tools and "<|im_start|>" in self.source:
            self.tool_template = env.from_string(CHATML_TOOLS_TEMPLATE)
        self.special_tokens = {"bos_token": "", "eos_token": "", **tokenizer.special_token_texts()}

    @property
    def tool_format(self) -> str:
        """The tool-call format the rendered prompts teach (a server/tool_parsers.py name)."""
        if self.tool_template is not self.template or self.source == FALLBACK_TEMPLATE:
            return "smollm2"
        if "<|python_tag|>" in self.source or "<|start_header_id|>" in self.source:
            return "llama3_json"
        if "<tool_call>" in self.source:
            return "hermes"
        return "smollm2"

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        """The conversation as text; `tools` (OpenAI tool definitions) are passed to the template
        as `tools`, and a conversation with tools, tool calls or tool results is rendered by the
        tool template when the model's own template ignores tools."""
        with_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        template = self.tool_template if with_tools else self.template
        if template is None:
            raise ToolsNotRenderedError("this model's chat template does not render tools, tool calls or tool "
                                        "results (and is not ChatML, for which sinkserve has one that does)")
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=tools or None, **self.special_tokens)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, LookupError, AttributeError, RecursionError) as exc:
            # What a template does with the request's messages is the request's problem: a 400.
            raise ChatTemplateError(f"the chat template failed: {exc}") from exc

    def encode(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
        """Token ids of the rendered conversation; special-token text becomes its id."""
        return self.tokenizer.encode_with_special_tokens(self.render(messages, add_generation_prompt, tools))
