"""Rendering chat messages with the model's own template (the GGUF `tokenizer.chat_template`).

The template is Jinja run in llama-cpp-python's sandboxed `Jinja2ChatFormatter` (the same environment and
filters as Hugging Face Transformers), always with `add_generation_prompt=True`. A GGUF without a template
falls back to ChatML, which is what most small instruct models (SmolLM2 included) use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tokentill.engines.base import Message

__all__ = ["CHATML", "ChatTemplate"]

logger = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


class ChatTemplate:
    """`render(messages) -> str`; pure and thread-safe (a compiled Jinja template has no mutable state)."""

    def __init__(self, metadata: Mapping[str, str], *, bos_token: str, eos_token: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = metadata.get("tokenizer.chat_template")
        if not template:
            logger.warning("the GGUF has no tokenizer.chat_template; using ChatML")
            template = CHATML
        self.source = template
        self._formatter: Any = Jinja2ChatFormatter(
            template=template, eos_token=eos_token, bos_token=bos_token, add_generation_prompt=True
        )

    def render(self, messages: tuple[Message, ...]) -> str:
        """The prompt text, special tokens written out (tokenize it with `special=True`)."""
        payload = [{"role": m.role, "content": m.text} for m in messages]
        return str(self._formatter(messages=payload).prompt)
