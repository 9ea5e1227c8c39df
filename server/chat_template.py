"""Chat messages to prompt tokens, through the model's jinja2 chat template.

The template comes from `tokenizer_config.json` (`chat_template`) and is rendered in a jinja2
sandbox with `messages`, `bos_token`, `eos_token` and `add_generation_prompt`, as transformers
does. Special-token text it produces (`<s>`, `</s>`) becomes the special token ids.

A model without a template (the bundled stories260K has none) gets the plain fallback: BOS, then
each message as `<role>: <content>` on its own line, then `assistant:` when a reply is wanted.
"""

from __future__ import annotations

import re

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.tokenizer import Tokenizer

FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    pass


def _raise_exception(message: str):
    raise ChatTemplateError(message)


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.source = template or tokenizer.chat_template or FALLBACK_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        self.template = env.from_string(self.source)
        self.bos_token = tokenizer.id_to_piece(tokenizer.bos_token_id)
        self.eos_token = tokenizer.id_to_piece(tokenizer.eos_token_id)
        specials = {self.bos_token: tokenizer.bos_token_id, self.eos_token: tokenizer.eos_token_id}
        self._special_ids = specials
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}") from exc

    def encode(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation; special-token text becomes its id."""
        text = self.render(messages, add_generation_prompt)
        ids: list[int] = []
        for piece in self._special_re.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            elif piece:
                ids.extend(self.tokenizer.encode(piece, add_bos=False))
        return ids
