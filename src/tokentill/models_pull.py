"""Downloading known-good small vision models (GGUF weights + mmproj projector) for `tokentill models pull`.

Contract of `pull(model, dest, base_url=...)`: both files end up in `dest` under their hub names, each
verified against a SHA-256, or `PullError` is raised and no final file of a failed download exists.
With `verify=False` (the CLI's `--no-verify`) a file for which no SHA-256 is known is downloaded
unverified instead of refused; a known SHA-256 is still checked and a mismatch is still an error.
Downloads go to `<name>.part` and are renamed only after the checksum matched, so an interrupted run
leaves no half file under the final name; a `.part` left over is resumed with an HTTP Range request
when the server supports it (and started over when it does not).

Where the checksum comes from: the registry's pinned `sha256` when it has one (then no header is
consulted); otherwise the SHA-256 of the LFS object that the download server publishes as the
`X-Linked-Etag` header of the `/resolve/` answer (Hugging Face's value, the same as the `oid sha256:` line
of the file's LFS pointer). A plain `ETag` is never used: it need not be a SHA-256 of the content. A
file for which neither is available is refused unless `verify=False`.

What that proves: a pinned hash proves the bytes are the ones the registry was written for. A published
hash comes from the same server as the bytes, so it catches truncation and corruption in transit, not a
changed upstream file or a dishonest mirror.

No network access happens at import; one `httpx2.Client` with explicit timeouts is opened per `pull`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx2

__all__ = [
    "DEFAULT_BASE_URL",
    "REGISTRY",
    "KnownModel",
    "Progress",
    "PullError",
    "Pulled",
    "RemoteFile",
    "catalog_entry",
    "pull",
]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://huggingface.co"
_CHUNK = 1024 * 1024
_MAX_REDIRECTS = 5
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TIMEOUT = httpx2.Timeout(connect=15.0, read=60.0, write=60.0, pool=15.0)


class PullError(Exception):
    """A download failed or did not verify; the message says which file and why."""


class _AlreadyThere(Exception):
    """The final file already matches the published checksum: nothing to download."""


@dataclass(frozen=True)
class RemoteFile:
    repo: str  # "owner/name" on the hub
    filename: str
    sha256: str | None = None  # pinned checksum; None = the server's published one (X-Linked-Etag)

    def __post_init__(self) -> None:
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ValueError(f"{self.filename}: pinned sha256 must be 64 lowercase hex digits")


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    weights: RemoteFile
    mmproj: RemoteFile
    context: int = 8192


def _smolvlm(size: str, text: str) -> KnownModel:
    repo = f"ggml-org/SmolVLM-{size}-Instruct-GGUF"
    return KnownModel(
        name=f"smolvlm-{size.lower()}",
        description=f"SmolVLM-{size}-Instruct (Q8_0): {text}, SigLIP vision encoder, Apache-2.0",
        weights=RemoteFile(repo, f"SmolVLM-{size}-Instruct-Q8_0.gguf"),
        mmproj=RemoteFile(repo, f"mmproj-SmolVLM-{size}-Instruct-Q8_0.gguf"),
    )


REGISTRY: dict[str, KnownModel] = {
    m.name: m
    for m in (
        _smolvlm("256M", "SmolLM2-135M text model"),
        _smolvlm("500M", "SmolLM2-360M text model"),
    )
}


class Progress:
    """Download progress sink; the CLI draws a bar, the default does nothing."""

    def start(self, filename: str, total: int | None, already: int) -> None:
        """A file begins: `total` bytes expected (None if unknown), `already` of them resumed."""

    def advance(self, n: int) -> None:
        """`n` more bytes arrived."""

    def finish(self) -> None:
        """The current file is complete (or failed)."""


def file_url(base_url: str, remote: RemoteFile) -> str:
    return f"{base_url.rstrip('/')}/{remote.repo}/resolve/main/{remote.filename}"


@dataclass(frozen=True)
class Pulled:
    """The files `pull` left in place; `unverified` names those downloaded with no SHA-256 to check."""

    weights: Path
    mmproj: Path
    unverified: tuple[str, ...] = ()


def pull(
    model: KnownModel,
    dest: Path,
    *,
    base_url: str = DEFAULT_BASE_URL,
    progress: Progress | None = None,
    verify: bool = True,
) -> Pulled:
    """Download (or find already verified) the weights and projector of `model`."""
    dest.mkdir(parents=True, exist_ok=True)
    sink = progress or Progress()
    unverified: list[str] = []
    with _client(base_url) as client:
        found = [
            _fetch(client, file_url(base_url, remote), dest, remote, sink, verify, unverified)
            for remote in (model.weights, model.mmproj)
        ]
    return Pulled(found[0], found[1], tuple(unverified))


def catalog_entry(model: KnownModel, weights: Path, mmproj: Path) -> str:
    """The `[[models]]` table to paste into the TOKENTILL_CONFIG file."""

    def toml_string(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join(
        [
            "[[models]]",
            f"id = {toml_string(model.name)}",
            'engine = "llamacpp"',
            f"weights = {toml_string(str(weights.resolve()))}",
            f"mmproj = {toml_string(str(mmproj.resolve()))}",
            f"context = {model.context}",
            'reasoning = "none"',
            f"description = {toml_string(model.description)}",
        ]
    )


@contextmanager
def _client(base_url: str) -> Iterator[httpx2.Client]:
    host = urlsplit(base_url).hostname or ""
    loopback = host in ("127.0.0.1", "::1", "localhost")
    # Proxies from the environment apply to the hub, never to a loopback mirror (tests, local caches).
    with httpx2.Client(timeout=_TIMEOUT, follow_redirects=False, trust_env=not loopback) as client:
        yield client


def _sha256_of(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest


def _published_sha256(headers: httpx2.Headers) -> str | None:
    """Hugging Face's SHA-256 of an LFS object (`X-Linked-Etag`); a plain ETag is not a content hash."""
    value = headers.get("x-linked-etag", "").strip().removeprefix("W/").strip('"').lower()
    return value if _SHA256.match(value) else None


def _fetch(
    client: httpx2.Client,
    url: str,
    dest: Path,
    remote: RemoteFile,
    sink: Progress,
    verify: bool,
    unverified: list[str],
) -> Path:
    final = dest / remote.filename
    part = dest / f"{remote.filename}.part"

    def present(sha256: str) -> bool:
        return final.is_file() and _sha256_of(final).hexdigest() == sha256

    if remote.sha256 and present(remote.sha256):
        return final
    try:
        expected, digest = _download(client, url, part, remote, sink, present, verify)
    except _AlreadyThere:
        logger.info("%s is already present and verified", final)
        return final
    if expected is None:
        logger.warning("%s was downloaded without checksum verification (--no-verify)", final)
        unverified.append(remote.filename)
    elif digest != expected:
        part.unlink(missing_ok=True)
        where = "pinned by the registry" if remote.sha256 else "published by the server (X-Linked-Etag)"
        raise PullError(
            f"{remote.filename}: checksum mismatch (expected sha256 {expected}, {where}; got {digest}); "
            "the download was deleted"
        )
    os.replace(part, final)
    return final


def _download(
    client: httpx2.Client,
    url: str,
    part: Path,
    remote: RemoteFile,
    sink: Progress,
    present: Callable[[str], bool],
    verify: bool,
) -> tuple[str | None, str]:
    """Stream `url` into `part` (appending when the server resumes); (expected sha256, actual sha256).

    The expected value is None only when nothing is known to check and `verify` is False.
    """
    resume = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={resume}-"} if resume else {}
    with _open(client, url, headers, remote, present) as (response, published):
        expected = remote.sha256 or published
        if expected is None and verify:
            raise PullError(
                f"{remote.filename}: the registry pins no SHA-256 and the server published none "
                "(X-Linked-Etag); refusing an unverified download (--no-verify accepts it)"
            )
        if expected is not None and present(expected):
            raise _AlreadyThere
        resumed = response.status_code == 206
        digest = _sha256_of(part) if resumed else hashlib.sha256()
        already = resume if resumed else 0
        length = response.headers.get("content-length")
        sink.start(remote.filename, already + int(length) if length and length.isdigit() else None, already)
        try:
            with part.open("ab" if resumed else "wb") as out:
                for block in response.iter_bytes(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    sink.advance(len(block))
        except httpx2.HTTPError as exc:
            raise PullError(
                f"{remote.filename}: the download broke off ({exc}); run again to resume"
            ) from exc
        finally:
            sink.finish()
    return expected, digest.hexdigest()


@contextmanager
def _open(
    client: httpx2.Client,
    url: str,
    headers: dict[str, str],
    remote: RemoteFile,
    present: Callable[[str], bool],
) -> Iterator[tuple[httpx2.Response, str | None]]:
    """The streamed 200/206 answer for `url` after following redirects by hand, and the published sha256.

    Redirects are followed here (not by httpx) because Hugging Face puts X-Linked-Etag on the `/resolve/`
    redirect, not on the CDN's final answer; when `present(sha256)` says the file is already there, the
    CDN is never asked (raises `_AlreadyThere`). With a pinned hash the headers are not consulted.
    """
    published: str | None = remote.sha256
    for _ in range(_MAX_REDIRECTS + 1):
        request = client.build_request("GET", url, headers=headers)
        try:
            response = client.send(request, stream=True)
        except httpx2.HTTPError as exc:
            raise PullError(f"{remote.filename}: cannot reach {url}: {exc}") from exc
        try:
            published = published or _published_sha256(response.headers)
            if response.is_redirect and "location" in response.headers:
                if published and present(published):
                    raise _AlreadyThere
                url = urljoin(url, response.headers["location"])
                continue
            if response.status_code == 416 and headers:  # a .part already complete or larger: start over
                headers = {}
                continue
            if response.status_code not in (200, 206):
                raise PullError(f"{remote.filename}: {url} answered HTTP {response.status_code}")
            yield response, published
            return
        finally:
            response.close()
    raise PullError(f"{remote.filename}: more than {_MAX_REDIRECTS} redirects")
