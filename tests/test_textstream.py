from edge_llm.textstream import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.push(p) for p in pieces] + [stream.finish()]


def test_multibyte_characters_split_across_tokens_wait_for_their_last_byte() -> None:
    text = "你好🙂"
    data = text.encode()
    pieces = [data[i : i + 1] for i in range(len(data))]  # the worst case: one byte per token
    out = feed(TextStream(), pieces)
    assert "".join(out) == text
    assert all("\ufffd" not in d for d in out)
    assert [d for d in out if d] == ["你", "好", "🙂"]


def test_unfinished_character_at_the_end_is_dropped() -> None:
    emoji = "🙂".encode()
    out = feed(TextStream(), [b"ok ", emoji[:2]])
    assert "".join(out) == "ok "


def test_stop_string_is_not_emitted_even_across_tokens() -> None:
    stream = TextStream(stop=("<END>",))
    out = feed(stream, [b"Hello <", b"EN", b"D> more"])
    assert "".join(out) == "Hello "
    assert stream.stopped


def test_text_that_only_looked_like_a_stop_string_is_released() -> None:
    stream = TextStream(stop=("<END>",))
    out = feed(stream, [b"a <E", b"ND", b"!"])
    assert out[0] == "a "  # "<E" is held: it may become "<END>"
    assert "".join(out) == "a <END!"
    assert not stream.stopped


def test_held_prefix_is_released_when_generation_ends() -> None:
    out = feed(TextStream(stop=("###",)), [b"x #", b"#"])
    assert out[:2] == ["x ", ""]
    assert out[-1] == "##"


def test_earliest_stop_string_wins() -> None:
    out = feed(TextStream(stop=("c", "abc")), [b"xxabc"])
    assert "".join(out) == "xx"  # "abc" starts before "c"


def test_invalid_utf8_from_the_model_becomes_replacement_characters() -> None:
    out = feed(TextStream(), [b"ok \xff\xfe", b" end"])
    joined = "".join(out)
    assert joined.startswith("ok ") and joined.endswith(" end")
    joined.encode("utf-8")  # valid: never raises


def test_nothing_after_a_stop() -> None:
    stream = TextStream(stop=("\n",))
    assert stream.push(b"one\ntwo") == "one"
    assert stream.push(b"three") == ""
    assert stream.finish() == ""
