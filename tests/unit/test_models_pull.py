"""`tokentill models pull` against a loopback HTTP server that imitates the hub (files made by the test).

The fake hub answers `/<repo>/resolve/main/<file>` with a redirect carrying `X-Linked-Etag` (as Hugging
Face does) to `/cdn/<file>`, which serves the bytes and honours `Range`. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from tokentill.cli.main import cli
from tokentill.models_pull import REGISTRY

MODEL = REGISTRY["smolvlm-256m"]


@dataclass
class FakeHub:
    files: dict[str, bytes] = field(default_factory=dict)  # filename -> body
    etags: dict[str, str] = field(default_factory=dict)  # filename -> published sha256 (override)
    ranges: list[str] = field(default_factory=list)  # Range headers received by the CDN
    plain_etag: bool = False  # also send `ETag: "<sha256 of the body>"` (must never be trusted alone)
    body_requests: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    state = FakeHub()
    prefix = f"/{MODEL.weights.repo}/resolve/main/"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.startswith(prefix):
                name = self.path[len(prefix) :]
                if name not in state.files:
                    self.send_error(404)
                    return
                etag = state.etags.get(name, hashlib.sha256(state.files[name]).hexdigest())
                self.send_response(302)
                self.send_header("Location", f"/cdn/{name}")
                if etag:
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                if state.plain_etag:
                    self.send_header("ETag", f'"{hashlib.sha256(state.files[name]).hexdigest()}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            name = self.path.removeprefix("/cdn/")
            body = state.files.get(name)
            if body is None:
                self.send_error(404)
                return
            state.body_requests += 1
            start, status = 0, 200
            wanted = self.headers.get("Range")
            if wanted:
                state.ranges.append(wanted)
                start, status = int(wanted.removeprefix("bytes=").rstrip("-")), 206
            self.send_response(status)
            if state.plain_etag:
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            try:
                self.wfile.write(body[start:])
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading (a refused download): expected

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _serve_model(hub: FakeHub) -> tuple[bytes, bytes]:
    weights, mmproj = b"GGUF weights " * 50_000, b"GGUF projector " * 3_000
    hub.files[MODEL.weights.filename] = weights
    hub.files[MODEL.mmproj.filename] = mmproj
    return weights, mmproj


def _pull(hub: FakeHub, dest: Path, *options: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        cli,
        ["models", "pull", MODEL.name, "--dest", str(dest), *options],
        env={"TOKENTILL_MODELS_BASE_URL": hub.url},
    )
    return result.exit_code, result.stdout, result.stderr


def _pin(monkeypatch: pytest.MonkeyPatch, weights: bytes, mmproj: bytes) -> None:
    """Replace the registry entry with one whose files carry pinned SHA-256s of `weights` and `mmproj`."""
    pinned = replace(
        MODEL,
        weights=replace(MODEL.weights, sha256=hashlib.sha256(weights).hexdigest()),
        mmproj=replace(MODEL.mmproj, sha256=hashlib.sha256(mmproj).hexdigest()),
    )
    monkeypatch.setitem(REGISTRY, MODEL.name, pinned)


def test_pull_downloads_verifies_and_prints_the_catalogue_entry(hub: FakeHub, tmp_path: Path) -> None:
    weights, mmproj = _serve_model(hub)
    code, out, err = _pull(hub, tmp_path / "m")
    assert code == 0, err
    assert (tmp_path / "m" / MODEL.weights.filename).read_bytes() == weights
    assert (tmp_path / "m" / MODEL.mmproj.filename).read_bytes() == mmproj
    assert not list((tmp_path / "m").glob("*.part"))
    assert MODEL.weights.filename in err and MODEL.mmproj.filename in err  # the progress bars' labels
    assert "downloaded and verified" in err
    entry = tomllib.loads(out)["models"][0]
    assert entry["id"] == MODEL.name
    assert entry["engine"] == "llamacpp"
    assert entry["weights"] == str((tmp_path / "m" / MODEL.weights.filename).resolve())
    assert entry["mmproj"] == str((tmp_path / "m" / MODEL.mmproj.filename).resolve())
    # A second pull finds both files verified and downloads no body again.
    before = hub.body_requests
    code, _, err = _pull(hub, tmp_path / "m")
    assert code == 0, err
    assert hub.body_requests == before


def test_checksum_mismatch_fails_and_leaves_no_file(hub: FakeHub, tmp_path: Path) -> None:
    _serve_model(hub)
    hub.etags[MODEL.weights.filename] = hashlib.sha256(b"something else").hexdigest()
    code, out, err = _pull(hub, tmp_path / "m")
    assert code != 0
    assert "checksum mismatch" in err
    assert not out.strip()
    assert list((tmp_path / "m").iterdir()) == []


def test_tampered_bytes_with_the_original_hash_header_are_refused(hub: FakeHub, tmp_path: Path) -> None:
    """The server publishes the original's SHA-256 but sends other bytes: mismatch, nothing left behind."""
    original, _ = _serve_model(hub)
    tampered = bytearray(original)
    tampered[12_345] ^= 0x01
    hub.files[MODEL.weights.filename] = bytes(tampered)
    hub.etags[MODEL.weights.filename] = hashlib.sha256(original).hexdigest()
    code, out, err = _pull(hub, tmp_path / "m")
    assert code != 0
    assert "checksum mismatch" in err and "X-Linked-Etag" in err
    assert not out.strip()
    assert list((tmp_path / "m").iterdir()) == []


def test_a_pinned_hash_needs_no_header(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights, mmproj = _serve_model(hub)
    _pin(monkeypatch, weights, mmproj)
    hub.etags[MODEL.weights.filename] = ""
    hub.etags[MODEL.mmproj.filename] = ""
    code, out, err = _pull(hub, tmp_path / "m")
    assert code == 0, err
    assert (tmp_path / "m" / MODEL.weights.filename).read_bytes() == weights
    assert tomllib.loads(out)["models"][0]["mmproj"].endswith(MODEL.mmproj.filename)
    # Already present: verified against the pin without asking the server at all.
    before = hub.body_requests
    assert _pull(hub, tmp_path / "m")[0] == 0
    assert hub.body_requests == before


def test_a_pinned_hash_wins_over_the_servers_header(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror serving other bytes with a matching X-Linked-Etag passes the header check, not the pin."""
    weights, mmproj = _serve_model(hub)
    _pin(monkeypatch, weights, mmproj)
    other = b"not the model " * 1000
    hub.files[MODEL.weights.filename] = other  # the hub advertises other's own hash
    code, _, err = _pull(hub, tmp_path / "m")
    assert code != 0
    assert "checksum mismatch" in err and "pinned by the registry" in err
    assert list((tmp_path / "m").iterdir()) == []


def test_a_bad_resumed_part_is_caught(hub: FakeHub, tmp_path: Path) -> None:
    """A `.part` whose bytes are wrong is resumed, and the whole file then fails the check."""
    weights, _ = _serve_model(hub)
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / f"{MODEL.weights.filename}.part").write_bytes(b"x" * 1000)
    code, _, err = _pull(hub, dest)
    assert code != 0
    assert hub.ranges == ["bytes=1000-"]
    assert "checksum mismatch" in err
    assert list(dest.iterdir()) == []


def test_a_plain_etag_is_not_a_checksum(hub: FakeHub, tmp_path: Path) -> None:
    _serve_model(hub)
    hub.etags[MODEL.weights.filename] = ""
    hub.plain_etag = True  # a 64-hex ETag on every answer, and no X-Linked-Etag for the weights
    code, _, err = _pull(hub, tmp_path / "m")
    assert code != 0
    assert "no SHA-256" in err and "--no-verify" in err
    assert not (tmp_path / "m" / MODEL.weights.filename).exists()


def test_no_verify_accepts_a_file_with_no_known_hash(hub: FakeHub, tmp_path: Path) -> None:
    weights, mmproj = _serve_model(hub)
    hub.etags[MODEL.weights.filename] = ""
    code, out, err = _pull(hub, tmp_path / "m", "--no-verify")
    assert code == 0, err
    assert f"{MODEL.weights.filename} was NOT verified" in err
    assert err.count("NOT verified") == 1  # the projector had a published hash and was checked
    assert (tmp_path / "m" / MODEL.weights.filename).read_bytes() == weights
    assert (tmp_path / "m" / MODEL.mmproj.filename).read_bytes() == mmproj
    assert tomllib.loads(out)["models"][0]["id"] == MODEL.name


def test_no_verify_still_checks_a_known_hash(hub: FakeHub, tmp_path: Path) -> None:
    _serve_model(hub)
    hub.etags[MODEL.weights.filename] = hashlib.sha256(b"something else").hexdigest()
    code, _, err = _pull(hub, tmp_path / "m", "--no-verify")
    assert code != 0
    assert "checksum mismatch" in err
    assert list((tmp_path / "m").iterdir()) == []


def test_missing_file_is_a_clear_error(hub: FakeHub, tmp_path: Path) -> None:
    hub.files[MODEL.weights.filename] = b"only the weights"
    code, _, err = _pull(hub, tmp_path / "m")
    assert code != 0
    assert "404" in err and MODEL.mmproj.filename in err
    assert not (tmp_path / "m" / MODEL.mmproj.filename).exists()


def test_no_published_checksum_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    _serve_model(hub)
    hub.etags[MODEL.weights.filename] = ""
    code, _, err = _pull(hub, tmp_path / "m")
    assert code != 0
    assert "no SHA-256" in err
    assert not (tmp_path / "m" / MODEL.weights.filename).exists()


def test_an_interrupted_download_resumes(hub: FakeHub, tmp_path: Path) -> None:
    weights, _ = _serve_model(hub)
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / f"{MODEL.weights.filename}.part").write_bytes(weights[:1000])
    code, _, err = _pull(hub, dest)
    assert code == 0, err
    assert hub.ranges == ["bytes=1000-"]
    assert (dest / MODEL.weights.filename).read_bytes() == weights


def test_models_list_names_the_registry() -> None:
    result = CliRunner().invoke(cli, ["models", "list"])
    assert result.exit_code == 0
    assert all(name in result.stdout for name in REGISTRY)
