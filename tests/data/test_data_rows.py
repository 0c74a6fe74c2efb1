"""Row forms accepted (and normalised) and rejected, through ``load_dataset``."""

from __future__ import annotations

import pytest
from PIL import Image

from vlmtune.data import ImagePart, PreferenceRow, RLRow, SFTRow, TextPart


def _only_row(load, row, kind="sft", **kw):
    rows, report = load([row], kind, **kw)
    assert report.dropped == [], report.dropped
    assert len(rows) == 1
    return rows[0], report


def _reason(load, row, kind="sft", **kw):
    rows, report = load([row], kind, **kw)
    assert rows == [] and report.valid == 0 and report.total == 1
    return report.dropped[0]["reason"]


# --- accepted forms ---------------------------------------------------------------


def test_single_image_sft_row(load, mk):
    png = mk.png((5, 3))
    row, report = _only_row(load, {**mk.sft(mk.data_url(png)), "metadata": {"id": 7}})
    assert isinstance(row, SFTRow) and row.line == 1 and row.metadata == {"id": 7}
    user, assistant = row.messages
    assert user.role == "user" and isinstance(user.parts[0], ImagePart)
    assert (user.parts[0].data, user.parts[0].width, user.parts[0].height) == (png, 5, 3)
    assert user.parts[1] == TextPart("What is this?")
    assert assistant.text == "A red square." and assistant.weight is None
    assert report.images == 1 and report.warnings == []


def test_image_url_as_plain_string_and_image_type_part(load, mk):
    url = mk.png_url()
    row = {
        "messages": [
            mk.user({"type": "image_url", "image_url": url}, "a"),
            mk.assistant(),
            mk.user({"type": "image", "image": url}, "b"),
            mk.assistant(),
        ]
    }
    parsed, report = _only_row(load, row)
    assert [len(m.images) for m in parsed.messages] == [1, 0, 1, 0]
    assert report.images == 2


def test_several_images_in_one_message_are_capped_with_a_warning(load, mk):
    urls = [mk.png_url((i * 40, 0, 0)) for i in range(3)]
    row = {"messages": [mk.user(*(mk.img(u) for u in urls), "compare"), mk.assistant()]}
    parsed, report = _only_row(load, row)
    assert len(parsed.messages[0].images) == 1 and report.images == 1
    assert report.warnings[0]["line"] == 1
    assert "3 images in one message" in report.warnings[0]["message"]
    assert report.warnings[0]["message"].startswith("messages[0]:")
    parsed, report = _only_row(load, row, max_images_per_message=None)
    assert len(parsed.messages[0].images) == 3 and report.warnings == []
    parsed, _ = _only_row(load, row, max_images_per_message=2)
    assert [p.data for p in parsed.messages[0].images] == [
        p.data for p in _only_row(load, row, max_images_per_message=None)[0].messages[0].images[:2]
    ]


def test_cap_does_not_read_truncated_images(load, mk):
    row = {
        "messages": [
            mk.user(mk.img(mk.png_url()), mk.img("https://x.test/a.png"), "q"),
            mk.assistant(),
        ]
    }
    _, report = _only_row(load, row)
    assert len(report.warnings) == 1


def test_multi_turn_with_images_in_several_user_turns_and_weights(load, mk):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            mk.user(mk.img(mk.png_url()), "first"),
            {**mk.assistant("one"), "weight": 0},
            mk.user(mk.img(mk.png_url((0, 0, 255))), "second"),
            {**mk.assistant("two"), "weight": 1},
        ]
    }
    parsed, report = _only_row(load, row)
    assert [m.role for m in parsed.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m.weight for m in parsed.messages] == [None, None, 0.0, None, 1.0]
    assert report.images == 2


def test_system_images_are_kept_and_not_capped(load, mk):
    system = {
        "role": "system",
        "content": [mk.img(mk.png_url()), mk.img(mk.png_url()), {"type": "text", "text": "ref"}],
    }
    parsed, report = _only_row(load, {"messages": [system, mk.user("hi"), mk.assistant()]})
    assert len(parsed.messages[0].images) == 2 and report.warnings == []


def test_legacy_images_with_placeholders_replaced_in_order(load, mk):
    red, blue = mk.png(color=(255, 0, 0)), mk.png(color=(0, 0, 255))
    row = {
        "images": [mk.data_url(red), mk.data_url(blue)],
        "messages": [
            {"role": "user", "content": "<image>\nLeft, then <image> right?"},
            mk.assistant(),
        ],
    }
    parsed, _ = _only_row(load, row, max_images_per_message=None)
    parts = parsed.messages[0].parts
    assert [type(p).__name__ for p in parts] == ["ImagePart", "TextPart", "ImagePart", "TextPart"]
    assert parts[0].data == red and parts[2].data == blue
    assert parts[1].text == "\nLeft, then " and parts[3].text == " right?"


def test_legacy_images_without_placeholders_go_before_the_first_user_text(load, mk):
    row = {
        "images": [mk.png_url()],
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "what?"},
            mk.assistant(),
        ],
    }
    parsed, _ = _only_row(load, row)
    assert [p.type for p in parsed.messages[1].parts] == ["image", "text"]
    assert parsed.messages[0].images == []


def test_legacy_placeholder_count_mismatch_is_dropped(load, mk):
    row = {
        "images": [mk.png_url()],
        "messages": [{"role": "user", "content": "<image> and <image>"}, mk.assistant()],
    }
    assert _reason(load, row) == "images: 1 image(s) but 2 <image> placeholder(s) in the text"


def test_sharegpt_conversations_with_llava_image(load, mk, tmp_path):
    (tmp_path / "cat.jpg").write_bytes(mk.jpeg((9, 9)))
    row = {
        "id": "x1",
        "image": "cat.jpg",
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": "A cat."},
        ],
    }
    parsed, report = _only_row(load, row)
    assert [m.role for m in parsed.messages] == ["system", "user", "assistant"]
    assert parsed.messages[1].images[0].mime == "image/jpeg" and report.images == 1
    assert _reason(load, {"conversations": [{"from": "bot", "value": "x"}]}).startswith(
        "conversations[0].from: unknown role 'bot'"
    )


def test_placeholder_without_images_list_is_kept_as_text_with_a_warning(load, mk):
    row = {"messages": [{"role": "user", "content": "<image> hi"}, mk.assistant()]}
    parsed, report = _only_row(load, row)
    assert (
        parsed.messages[0].text == "<image> hi"
        and "no 'images' list" in report.warnings[0]["message"]
    )


def test_rl_prompt_row(load, mk):
    row = {
        "messages": [mk.user(mk.img(mk.png_url()), "Count the squares.")],
        "metadata": {"answer": "1"},
    }
    parsed, _ = _only_row(load, row, kind="rl")
    assert isinstance(parsed, RLRow) and parsed.metadata == {"answer": "1"}
    reason = _reason(load, {"messages": [mk.user("q"), mk.assistant()]}, kind="rl")
    assert reason == (
        "messages[1]: last turn is 'assistant'; an RL prompt must end with a user turn "
        "(or a tool response)"
    )


def _pref(mk, chosen_prompt_url, rejected_prompt_url, rejected_text="What is this?"):
    def side(url, text, answer):
        return {"messages": [mk.user(mk.img(url), text), mk.assistant(answer)]}

    return {
        "chosen": side(chosen_prompt_url, "What is this?", "A red square."),
        "rejected": side(rejected_prompt_url, rejected_text, "A dog."),
    }


def test_preference_row(load, mk):
    url = mk.png_url()
    parsed, report = _only_row(load, _pref(mk, url, url), kind="preference")
    assert isinstance(parsed, PreferenceRow)
    assert parsed.chosen[-1].text == "A red square." and parsed.rejected[-1].text == "A dog."
    assert parsed.chosen[0].images[0].data == parsed.rejected[0].images[0].data
    assert report.images == 1


def test_preference_prompts_must_match(load, mk):
    url = mk.png_url()
    other = mk.png_url((0, 255, 0))
    for row, detail in [
        (_pref(mk, url, other), "messages[0] images"),
        (_pref(mk, url, url, rejected_text="Other?"), "messages[0] text"),
    ]:
        assert (
            _reason(load, row, kind="preference")
            == f"chosen and rejected prompts differ ({detail})"
        )
    row = _pref(mk, url, url)
    row["rejected"]["messages"].append(mk.user("more?"))
    assert (
        _reason(load, row, kind="preference")
        == "rejected.messages: must end with an assistant turn"
    )


# --- rejections -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            "{not json",
            "not valid JSON: Expecting property name enclosed in double quotes (column 2)",
        ),
        ("[1, 2]", "row is an array, not a JSON object"),
        ("42", "row is a number, not a JSON object"),
        ({"metadata": {}}, "messages: row has no 'messages' (or ShareGPT 'conversations') array"),
        ({"messages": []}, "messages: is empty"),
        ({"messages": "hi"}, "messages: must be an array of messages (got string)"),
        (
            {"messages": [{"role": "function", "content": "x"}]},
            "messages[0].role: unknown role 'function' "
            "(expected one of 'system', 'user', 'assistant', 'tool')",
        ),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "messages[0].role: a tool message must follow an assistant message with "
            "tool_calls (or another tool message)",
        ),
        ({"messages": [{"role": "user"}]}, "messages[0].content: missing"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages[0].content[0].type: unknown part type 'audio' (expected 'text', 'image_url' or 'image')",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}]},
            "messages[0].content[0].text: empty text",
        ),
        (
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
            "messages[0].content: empty text",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}]},
            "messages: no assistant turn (an SFT row needs at least one)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": 0.5},
                ]
            },
            "messages[1].weight: must be 0 or 1 (got 0.5)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ],
                "metadata": [1],
            },
            "metadata: must be an object (got array)",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 3}]}]},
            "messages[0].content[0].image_url: must be an object with a string 'url' or a URL string (got number)",
        ),
    ],
)
def test_rejections_name_the_field(load, row, reason):
    assert _reason(load, row) == reason


def test_image_rejections_name_the_field(load, mk):
    jpeg_as_png = mk.data_url(mk.jpeg(), "image/png")
    row = {"messages": [mk.user("look", mk.img(jpeg_as_png)), mk.assistant()]}
    assert _reason(load, row) == (
        "messages[0].content[1].image_url.url: data URL declares image/png but the bytes are JPEG"
    )
    row = {"messages": [mk.user("q"), {"role": "assistant", "content": [mk.img(mk.png_url())]}]}
    assert _reason(load, row).startswith(
        "messages[1].content[0].image_url.url: images are not allowed"
    )
    bomb = mk.data_url(mk.png((50, 50)))
    assert "over the limit" in _reason(load, mk.sft(bomb), max_image_pixels=100)
    jpeg = mk.jpeg((64, 64))
    truncated = mk.data_url(jpeg[: len(jpeg) // 2], "image/jpeg")
    assert "corrupt or truncated JPEG" in _reason(load, mk.sft(truncated))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = mk.data_url(mk.jpeg((40, 20), exif=exif.tobytes()), "image/jpeg")
    image = _only_row(load, mk.sft(rotated))[0].messages[0].images[0]
    assert (image.width, image.height) == (20, 40)


def test_blank_lines_are_skipped_and_line_numbers_are_one_based(load, mk):
    rows, report = load(["", mk.sft(), "   ", "nope", mk.sft("missing.png")])
    assert [r.line for r in rows] == [2]
    assert report.total == 3 and report.valid == 1
    assert [d["line"] for d in report.dropped] == [4, 5]


def test_invalid_utf8_line_is_dropped(tmp_path, mk):
    from vlmtune.data import load_dataset

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"messages": "\xff"}\n')
    _, report = load_dataset(path)
    assert report.dropped == [{"line": 1, "reason": "not valid UTF-8 (byte 14)"}]


def test_unexpected_exception_becomes_an_internal_error_drop(load, mk, monkeypatch):
    import vlmtune.data.rows as rows_mod

    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(rows_mod, "resolve_image", boom)
    assert _reason(load, mk.sft()) == "internal error: KeyError: 'surprise'"
