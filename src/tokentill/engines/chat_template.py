"""Rendering chat messages with the model's own template (the GGUF `tokenizer.chat_template`).

The template is Jinja run in llama-cpp-python's sandboxed `Jinja2ChatFormatter` (the same environment and
filters as Hugging Face Transformers), always with `add_generation_prompt=True`. A GGUF without a template
falls back to ChatML, which is what most small instruct models (SmolLM2 included) use.

Images: the vision engine renders each image as a media marker (a text string libmtmd later replaces with
the image's embeddings), placed before the message's text. Templates differ in what `content` they take:
SmolLM2's concatenates it as a string, SmolVLM's iterates a list of typed parts. `ChatTemplate` probes the
template once and then passes either a string or `[{"type": "text", "text": ...}, ...]`, always with the
marker as *text*, so a template never emits its own image token (which libmtmd would not know).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from tokentill.types import Message

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
        self.content_mode: Literal["string", "parts"] = self._probe_content_mode()

    def render(self, messages: tuple[Message, ...], *, media_marker: str | None = None) -> str:
        """The prompt text, special tokens written out (tokenize it with `special=True`).

        With `media_marker`, each message's images become that many markers before its text (and the
        marker is removed from the text itself, so a client cannot add image slots). Without it, images
        are ignored: only the vision engine passes a marker, and chat.py refuses images elsewhere.
        """
        payload = [self._message(m, media_marker) for m in messages]
        return self._apply(payload)

    def _message(self, message: Message, marker: str | None) -> dict[str, Any]:
        if marker is None or not message.images:
            text = message.text if marker is None else message.text.replace(marker, "")
            if self.content_mode == "parts":
                return {"role": message.role, "content": [{"type": "text", "text": text}]}
            return {"role": message.role, "content": text}
        # Each image becomes one marker where the client put it; the marker is removed from client text
        # first, so a client cannot add image slots.
        pieces = [
            p.replace(marker, "").strip("\n") if isinstance(p, str) else marker for p in message.pieces()
        ]
        pieces = [p for p in pieces if p]
        if self.content_mode == "parts":
            return {"role": message.role, "content": [{"type": "text", "text": p} for p in pieces]}
        return {"role": message.role, "content": "\n".join(pieces)}

    def _apply(self, payload: list[dict[str, Any]]) -> str:
        return str(self._formatter(messages=payload).prompt)

    def _probe_content_mode(self) -> Literal["string", "parts"]:
        """ "string" unless the template drops string content but renders a list of text parts."""
        probe = "tokentill-probe-3b9e"
        for mode, content in (("string", probe), ("parts", [{"type": "text", "text": probe}])):
            try:
                if probe in self._apply([{"role": "user", "content": content}]):
                    return "string" if mode == "string" else "parts"
            except Exception:  # a template may raise on the shape it does not expect
                continue
        return "string"
