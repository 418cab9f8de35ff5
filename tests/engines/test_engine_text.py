"""StopMatcher / TextAssembler: stop strings never leak, partial matches are held back, UTF-8 is whole."""

from __future__ import annotations

from tokentill.engines.text import StopMatcher, TextAssembler


def _run(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out: list[str] = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        if text:
            out.append(text)
        if stopped:
            return out, True
    tail = matcher.flush()
    return out + ([tail] if tail else []), False


def test_no_stops_passes_through() -> None:
    assert _run(StopMatcher(()), ["a", "b"]) == (["a", "b"], False)


def test_stop_split_across_pieces_is_cut_and_held_back() -> None:
    out, stopped = _run(StopMatcher(["END"]), ["hello E", "N", "D and more"])
    assert stopped
    assert "".join(out) == "hello "
    assert out[0] == "hello "  # "E" was held back, not sent


def test_partial_match_released_when_it_fails_or_stream_ends() -> None:
    out, stopped = _run(StopMatcher(["END"]), ["hello EN", "X"])
    assert not stopped and "".join(out) == "hello ENX"
    out, stopped = _run(StopMatcher(["END"]), ["hello EN"])
    assert not stopped and out == ["hello ", "EN"]


def test_earliest_of_several_stops_wins() -> None:
    out, stopped = _run(StopMatcher(["world", "lo"]), ["hello world"])
    assert stopped and "".join(out) == "hel"


def test_multibyte_character_split_across_tokens() -> None:
    text = TextAssembler(())
    data = "é€".encode()
    pieces = [text.feed_bytes(data[i : i + 1])[0] for i in range(len(data))]
    assert "".join(pieces) == "é€"
    assert all(p in ("", "é", "€") for p in pieces)
    assert text.finish() == ""


def test_incomplete_character_at_end_becomes_replacement() -> None:
    text = TextAssembler(())
    assert text.feed_bytes("€".encode()[:2]) == ("", False)
    assert text.finish() == "\ufffd"


def test_stop_inside_multibyte_stream() -> None:
    text = TextAssembler(["€"])
    out = [text.feed_bytes(b) for b in (b"a", "€".encode()[:1], "€".encode()[1:], b"b")]
    assert out[-1][1] is True or out[-2][1] is True
    assert "".join(t for t, _ in out) == "a"
