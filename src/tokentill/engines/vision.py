"""Images through libmtmd (llama.cpp's multimodal library): a projector GGUF beside the text model.

`VisionEncoder` owns one `mtmd_context`. Threads — the hazard of this module:
  * `__init__` runs while the engine starts (before the decode thread exists) and `close` after that
    thread was joined;
  * everything else (`count`, `take`, `evaluate`) runs **on the decode thread only**, through
    `Scheduler.call` or inside the runner's prefill: libmtmd's preprocessing and encoding share buffers
    in the context, and `evaluate` writes the llama context's KV cache (one sequence id of it) and
    overwrites its logits, so the runner calls it only after the step's samplers have read theirs.

Contract of a prompt with images: the chat template renders one `marker` per image; `count` tokenizes it
with the validated images (`mtmd_tokenize`: text tokens plus image chunks, no encoding) and returns the
exact token counts, keeping the tokenized chunks in a small cache keyed by the content; the runner's
prefill then `take`s them (or tokenizes again after an eviction: same input, same counts) and
`evaluate`s them into the KV cache, encoding each image on the way. Images arrive as PNG bytes the media
layer already validated; they are decoded with Pillow to RGB here and never fetched.

Failures inside libmtmd raise `VisionError`; the scheduler turns them into a 502 for that request only.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import io
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from tokentill.types import ImageInput

__all__ = ["PromptCounts", "Tokenized", "VisionEncoder", "VisionError"]

logger = logging.getLogger(__name__)
_native_log = logging.getLogger("tokentill.engines.libmtmd")

_CACHE_SIZE = 4  # tokenized prompts kept between count_prompt_tokens and prefill
_CHUNK_TEXT = 0  # MTMD_INPUT_CHUNK_TYPE_TEXT

# ggml log levels: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line.
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_log_callback: Any = None  # the ctypes callback must stay referenced for the life of the process


class VisionError(Exception):
    """libmtmd could not load the projector or process an image."""


@dataclass(frozen=True)
class PromptCounts:
    total: int  # all prompt tokens, image tokens included
    image: int  # tokens that stand for image embeddings


@dataclass
class _Chunk:
    pointer: int  # mtmd_input_chunk *, owned by the Tokenized's chunk list
    tokens: list[int] | None  # text chunk: its token ids; media chunk: None
    n_tokens: int


@dataclass
class Tokenized:
    """Native `mtmd_input_chunks` plus what we read from them; call `free` exactly once (decode thread)."""

    handle: int
    chunks: list[_Chunk] = field(default_factory=list)
    _lib: Any = None

    @property
    def counts(self) -> PromptCounts:
        image = sum(c.n_tokens for c in self.chunks if c.tokens is None)
        return PromptCounts(total=sum(c.n_tokens for c in self.chunks), image=image)

    @property
    def leading_tokens(self) -> list[int]:
        """Text tokens before the first image: the only part of a vision prompt whose KV can be reused."""
        first = self.chunks[0] if self.chunks else None
        return list(first.tokens) if first is not None and first.tokens is not None else []

    def free(self) -> None:
        if self.handle:
            self._lib.mtmd_input_chunks_free(self.handle)
            self.handle = 0
            self.chunks = []


def _install_log_callback(llama_cpp: Any, mtmd: Any) -> None:
    """Send libmtmd's and clip's log lines to logging (debug, or warning/error) instead of stderr."""
    global _log_callback
    if _log_callback is not None:
        return

    def forward(level: int, text: bytes | None, _user_data: Any) -> None:
        message = text.decode("utf-8", "replace").rstrip() if text else ""
        if message:
            _native_log.log(_LEVELS.get(level, logging.DEBUG), "%s", message)

    _log_callback = llama_cpp.llama_log_callback(forward)
    mtmd.mtmd_log_set(_log_callback, None)
    mtmd.mtmd_helper_log_set(_log_callback, None)


class VisionEncoder:
    """One projector loaded beside one `llama_cpp.Llama`; see the module docstring for the threads."""

    def __init__(self, llm: Any, mmproj: Path, *, n_threads: int) -> None:
        """`llm` gives the model weights only; `evaluate` writes into the context it is given."""
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self._llama_cpp: Any = llama_cpp
        self._mtmd: Any = mtmd
        self._llm = llm
        _install_log_callback(llama_cpp, mtmd)
        # A marker no client can guess: user text containing it could otherwise add image slots.
        self.marker = f"<__tokentill_media_{secrets.token_hex(8)}__>"
        self._marker_bytes = self.marker.encode()  # kept alive: the params struct points into it
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = n_threads
        params.media_marker = self._marker_bytes
        params.warmup = True  # encode one image now: a projector that cannot run fails at start-up
        ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
        if not ctx:
            raise VisionError(
                f"libmtmd could not load the projector {mmproj} with this text model (see the log above)"
            )
        self._ctx: Any = ctx
        self._cache: collections.OrderedDict[bytes, Tokenized] = collections.OrderedDict()
        try:
            if not mtmd.mtmd_support_vision(ctx):
                raise VisionError(f"{mmproj} is not a vision projector")
            self._check_marker_tokens(mmproj)
        except BaseException:
            self.close()
            raise

    def _check_marker_tokens(self, mmproj: Path) -> None:
        """Some projectors wrap images in special tokens; absent from the text vocabulary they become -1."""
        probe = ImageInput(data=b"", mime="image/png", width=8, height=8)
        tokenized = self._tokenize(f"a{self.marker}b", [probe], add_special=False, pixels=[bytes(8 * 8 * 3)])
        try:
            if any(t < 0 for c in tokenized.chunks if c.tokens is not None for t in c.tokens):
                raise VisionError(
                    f"{mmproj} needs image marker tokens that the text model's vocabulary lacks: "
                    "use the text model this projector was made for"
                )
        finally:
            tokenized.free()

    # --- decode thread only -------------------------------------------------------------------------

    def count(self, text: str, images: Sequence[ImageInput], *, add_special: bool) -> PromptCounts:
        """Exact token counts of the prompt; keeps the tokenized chunks for the prefill that follows."""
        key = _key(text, images, add_special)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached.counts
        tokenized = self._tokenize(text, images, add_special=add_special)
        self._cache[key] = tokenized
        while len(self._cache) > _CACHE_SIZE:
            _, evicted = self._cache.popitem(last=False)
            evicted.free()
        return tokenized.counts

    def take(self, text: str, images: Sequence[ImageInput], *, add_special: bool) -> Tokenized:
        """The tokenized prompt, now owned by the caller (who must `free` it)."""
        cached = self._cache.pop(_key(text, images, add_special), None)
        return cached if cached is not None else self._tokenize(text, images, add_special=add_special)

    def evaluate(
        self, tokenized: Tokenized, *, ctx: Any, seq_id: int, n_past: int, skip: int, n_batch: int
    ) -> tuple[int, int]:
        """Decode every chunk but the prompt's last token into sequence `seq_id` of `ctx`, from position
        `n_past` on (the first `skip` tokens of a leading text chunk are already there).

        Returns (next position, last token): the caller evaluates that token in its own batch, so the
        logits it samples from come from that batch (this method's own decodes request none).
        """
        mtmd = self._mtmd
        chunks = tokenized.chunks
        if not chunks or chunks[-1].tokens is None or not chunks[-1].tokens:
            raise VisionError("a prompt with images must end with text (the generation prompt)")
        last_token = chunks[-1].tokens[-1]
        for index, chunk in enumerate(chunks):
            if chunk.tokens is not None:
                tokens = chunk.tokens[skip:] if index == 0 else chunk.tokens
                if index == len(chunks) - 1:
                    tokens = tokens[:-1]
                n_past = self._decode_text(ctx, tokens, n_past=n_past, seq_id=seq_id, n_batch=n_batch)
                continue
            new_n_past = self._llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_eval_chunk_single(
                self._ctx, ctx, chunk.pointer, n_past, seq_id, n_batch, False, ctypes.byref(new_n_past)
            )
            if rc != 0:
                raise VisionError(f"libmtmd failed to encode or decode an image (code {rc})")
            n_past = int(new_n_past.value)
        return n_past, last_token

    def _decode_text(self, ctx: Any, tokens: list[int], *, n_past: int, seq_id: int, n_batch: int) -> int:
        """Evaluate `tokens` into `seq_id` at positions `n_past`…, in `n_batch` pieces, without logits."""
        if not tokens:
            return n_past
        lib = self._llama_cpp
        batch = lib.llama_batch_init(n_batch, 0, 1)
        try:
            for start in range(0, len(tokens), n_batch):
                piece = tokens[start : start + n_batch]
                for i, token in enumerate(piece):
                    batch.token[i] = token
                    batch.pos[i] = n_past + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq_id
                    batch.logits[i] = False
                batch.n_tokens = len(piece)
                rc = int(lib.llama_decode(ctx, batch))
                if rc != 0:
                    raise VisionError(f"llama_decode returned {rc} for the text around an image")
        finally:
            lib.llama_batch_free(batch)
        return n_past + len(tokens)

    def _tokenize(
        self,
        text: str,
        images: Sequence[ImageInput],
        *,
        add_special: bool,
        pixels: list[bytes] | None = None,
    ) -> Tokenized:
        mtmd = self._mtmd
        if text.count(self.marker) != len(images):
            raise VisionError(
                f"the chat template kept {text.count(self.marker)} of {len(images)} image markers"
            )
        bitmaps: list[int] = []
        chunks = mtmd.mtmd_input_chunks_init()
        if not chunks:
            raise VisionError("libmtmd could not allocate input chunks")
        tokenized = Tokenized(handle=chunks, _lib=mtmd)
        try:
            for index, image in enumerate(images):
                width, height, raw = (
                    (image.width, image.height, pixels[index]) if pixels is not None else _rgb(image)
                )
                buffer = (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)
                bitmap = mtmd.mtmd_bitmap_init(width, height, buffer)  # copies the pixels
                if not bitmap:
                    raise VisionError("libmtmd could not allocate an image bitmap")
                bitmaps.append(bitmap)
            encoded = text.encode("utf-8")
            source = mtmd.mtmd_input_text()
            source.text = encoded
            source.text_len = len(encoded)
            source.add_special = add_special
            source.parse_special = True
            array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(source), array, len(bitmaps))
            if rc != 0:
                raise VisionError(f"libmtmd could not tokenize the prompt with its images (code {rc})")
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                pointer = mtmd.mtmd_input_chunks_get(chunks, i)
                n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(pointer))
                tokens: list[int] | None = None
                if mtmd.mtmd_input_chunk_get_type(pointer) == _CHUNK_TEXT:
                    n_out = ctypes.c_size_t()
                    ids = mtmd.mtmd_input_chunk_get_tokens_text(pointer, ctypes.byref(n_out))
                    tokens = [int(ids[j]) for j in range(n_out.value)]
                tokenized.chunks.append(_Chunk(pointer=pointer, tokens=tokens, n_tokens=n_tokens))
        except BaseException:
            tokenized.free()
            raise
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        return tokenized

    # --- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Free cached chunks and the context; call only once the decode thread has stopped."""
        for tokenized in self._cache.values():
            tokenized.free()
        self._cache.clear()
        ctx, self._ctx = self._ctx, None
        if ctx:
            self._mtmd.mtmd_free(ctx)


def _rgb(image: ImageInput) -> tuple[int, int, bytes]:
    """Decode the validated PNG to RGB pixels. The media layer already sized it for its `detail`
    (`MediaPolicy.low_detail_side` / `high_detail_side`, the one place those sizes live)."""
    with Image.open(io.BytesIO(image.data)) as img:
        img.load()
        rgb = img.convert("RGB")
    return rgb.width, rgb.height, rgb.tobytes()


def _key(text: str, images: Sequence[ImageInput], add_special: bool) -> bytes:
    digest = hashlib.sha256(text.encode("utf-8"))
    digest.update(b"\x01" if add_special else b"\x00")
    for image in images:
        digest.update(f"\x00{image.detail}\x00{len(image.data)}\x00".encode())
        digest.update(hashlib.sha256(image.data).digest())
    return digest.digest()
