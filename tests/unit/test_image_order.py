"""Images keep their place among a message's text parts, from the request to the rendered prompt."""

from __future__ import annotations

from tokentill.types import ImageInput, Message

IMG_A = ImageInput(data=b"a", mime="image/png", width=1, height=1)
IMG_B = ImageInput(data=b"b", mime="image/png", width=1, height=1)


def test_pieces_follow_offsets() -> None:
    message = Message("user", "first\nsecond", images=(IMG_A, IMG_B), image_offsets=(0, 6))
    assert message.pieces() == [IMG_A, "first\n", IMG_B, "second"]


def test_pieces_without_offsets_put_images_first() -> None:
    assert Message("user", "text", images=(IMG_A,)).pieces() == [IMG_A, "text"]


def test_rendered_prompt_places_markers_in_order() -> None:
    from tokentill.engines.chat_template import ChatTemplate  # llama-cpp-python is a hard dependency

    template = ChatTemplate({}, bos_token="", eos_token="<|im_end|>")  # no GGUF template: ChatML
    message = Message("user", "look at this\nand this<M>", images=(IMG_A, IMG_B), image_offsets=(13, 21))
    prompt = template.render((message,), media_marker="<M>")
    body = prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    assert body == "look at this\n<M>\nand this\n<M>"  # the client's own "<M>" was removed
