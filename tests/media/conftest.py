"""Fixtures for the media tests (helpers live in `helpers.py`). Loopback traffic only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image

from tests.media.helpers import LoopbackServer


@pytest.fixture(autouse=True)
def _restore_pillow_globals() -> Iterator[None]:
    """MediaService.start() tightens Image.MAX_IMAGE_PIXELS process-wide; undo it between tests."""
    saved = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = saved


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
