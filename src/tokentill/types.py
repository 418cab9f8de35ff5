"""The domain types every layer shares: what a chat is made of and what generating one yields.

`protocol`, `media`, `idempotency`, the request lifecycle, `api` and the engines all speak these, so they live
below all of them (like Starlette's `types.py`): this module imports nothing from tokentill. A chat reaches an
engine as `Message`s (images already fetched and validated as `ImageInput`s) and comes back as a stream of
`EngineEvent`s: zero or more `TextDelta`s, then exactly one `Finished` carrying the `Usage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["EngineEvent", "FinishReason", "Finished", "ImageInput", "Message", "TextDelta", "Usage"]

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ImageInput:
    """An image that the media layer already fetched and validated; engines never fetch anything."""

    data: bytes
    mime: str
    width: int
    height: int
    detail: str = "auto"


@dataclass(frozen=True)
class Message:
    """One chat message with text already joined; `images` are in the order they appeared."""

    role: str  # system | user | assistant  (developer is mapped to system before it gets here)
    text: str
    images: tuple[ImageInput, ...] = ()
    # Where each image sat: an offset into `text` per image, ascending. Empty = all images before the text.
    image_offsets: tuple[int, ...] = ()

    def pieces(self) -> list[str | ImageInput]:
        """Text and images in the order the client sent them (empty text pieces left out)."""
        offsets = (
            self.image_offsets if len(self.image_offsets) == len(self.images) else (0,) * len(self.images)
        )
        out: list[str | ImageInput] = []
        start = 0
        for offset, image in zip(offsets, self.images, strict=True):
            if self.text[start:offset]:
                out.append(self.text[start:offset])
            out.append(image)
            start = offset
        if self.text[start:]:
            out.append(self.text[start:])
        return out


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # reasoning tokens included
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    image_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    text: str
    reasoning: bool = False  # hidden reasoning, not part of `content`
    # Completion tokens this delta accounts for (billing of interrupted streams). Engines put every token
    # on a delta as it is generated, so a delta may carry tokens and no text (half a character, a held-back
    # stop prefix); renderers skip empty text.
    tokens: int = 1


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    usage: Usage


EngineEvent = TextDelta | Finished
