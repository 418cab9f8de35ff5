"""StopMatcher / TextAssembler: stop strings never leak, partial matches are held back, UTF-8 is whole."""

from __future__ import annotations

from tokentill.engines.text import StopMatcher, TextAssembler
from tokentill.types import TextDelta


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


def _text(deltas: list[TextDelta], *, reasoning: bool = False) -> str:
    return "".join(d.text for d in deltas if d.reasoning == reasoning)


def test_multibyte_character_split_across_tokens() -> None:
    text = TextAssembler(())
    data = "é€".encode()
    pieces = [text.feed_bytes(data[i : i + 1]) for i in range(len(data))]
    assert all(len(p) == 1 and p[0].tokens == 1 for p in pieces)  # one delta per token, text or not
    assert "".join(p[0].text for p in pieces) == "é€"
    assert all(p[0].text in ("", "é", "€") for p in pieces)
    assert text.finish() == []


def test_incomplete_character_at_end_becomes_replacement() -> None:
    text = TextAssembler(())
    assert text.feed_bytes("€".encode()[:2]) == [TextDelta("", tokens=1)]
    assert text.finish() == [TextDelta("\ufffd", tokens=0)]


def test_stop_inside_multibyte_stream() -> None:
    text = TextAssembler(["€"])
    out = [d for b in (b"a", "€".encode()[:1], "€".encode()[1:]) for d in text.feed_bytes(b)]
    assert text.stopped
    assert _text(out) == "a" and sum(d.tokens for d in out) == 3
    assert text.finish() == []


def test_every_token_is_on_exactly_one_delta() -> None:
    """Emoji and CJK one byte per token, with a stop prefix held back: the tokens add up either way."""
    text = TextAssembler(["🙂!"])
    data = "猫は🙂🙂x".encode()
    deltas = [d for i in range(len(data)) for d in text.feed_bytes(data[i : i + 1])]
    assert sum(d.tokens for d in deltas) == len(data)
    assert _text(deltas) == "猫は🙂🙂x"  # the 🙂 held back as a possible stop came out with the x
    assert not text.stopped
    tail = text.finish()
    assert tail == [] and sum(d.tokens for d in tail) == 0


def test_held_back_text_comes_out_at_the_end_without_tokens() -> None:
    text = TextAssembler(["STOP"])
    deltas = text.feed_text("go ST")
    assert _text(deltas) == "go " and sum(d.tokens for d in deltas) == 1
    assert text.finish() == [TextDelta("ST", tokens=0)]


def test_think_tags_split_and_stop_strings_apply_to_the_answer_only() -> None:
    text = TextAssembler(["STOP"], think_tags=True)
    stream = "<think>plan: say STOP</think>the answer STOP more"
    deltas = [d for i in range(0, len(stream), 3) for d in text.feed_text(stream[i : i + 3])]
    assert text.stopped
    assert _text(deltas, reasoning=True) == "plan: say STOP"
    assert _text(deltas) == "the answer "
    assert sum(d.tokens for d in deltas) == len(range(0, len(stream), 3))
    assert text.finish() == []


def test_prefilled_think_starts_inside_and_tag_tokens_are_reasoning() -> None:
    text = TextAssembler((), think_tags=True, thinking=True)
    tokens = ["plan", "</think>", "answer"]
    deltas = [text.feed_text(t) for t in tokens]
    assert deltas[0] == [TextDelta("plan", reasoning=True)]
    assert deltas[1] == [TextDelta("", reasoning=True)]  # the closing tag: a reasoning token, no text
    assert deltas[2] == [TextDelta("answer")]
    assert not text.thinking and text.finish() == []


def test_one_token_across_a_tag_gives_two_deltas_and_one_token() -> None:
    text = TextAssembler((), think_tags=True)
    deltas = text.feed_text("<think>a</think>b")
    assert deltas == [TextDelta("a", reasoning=True, tokens=1), TextDelta("b", tokens=0)]


def test_unfinished_think_block_is_reasoning() -> None:
    text = TextAssembler((), think_tags=True)
    deltas = text.feed_text("<think>still going </thi")
    assert _text(deltas, reasoning=True) == "still going "
    assert text.finish() == [TextDelta("</thi", reasoning=True, tokens=0)]
