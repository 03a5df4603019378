"""Compact vocabulary: the real tokenizer, with the model's embedding and LM head kept to the token ids
a data set uses.

A model trained from scratch on a small domain (the embedded demo: a few hundred distinct tokens) does
not need 151,936 output rows; on a laptop CPU the full-vocabulary LM head is nearly all of the compute.
With `model.compact_vocab`, row k of the embedding and LM head is tokenizer id `vocab_ids[k]`:

* kept: every id the data's conversations encode to, all 256 byte-level tokens and the tokenizer's
  added special tokens; padded with the lowest unused ids to a multiple of `multiple` (shardable);
* `CompactTokenizer` maps ids in (encode) and out (decode). Text with a token outside the kept set
  (a generated answer re-tokenised, an unseen prompt word) is spelled with its byte-level tokens, so
  every text still encodes and decodes exactly;
* the ids travel with the model (`Qwen2VLConfig.vocab_ids`, saved in `model_config.json`), so every
  stage that loads the checkpoint maps the same way. Teacher and student must share them for KD.

Published Qwen2-VL checkpoints keep the full vocabulary (`vocab_ids = None`); nothing changes for them.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

BYTE_TOKENS = 256  # byte-level BPE (Qwen2): ids 0..255 are the single-byte tokens


def byte_token_ids(tokenizer) -> list[int]:
    """The ids of the single-character (byte-level) tokens; any text can be spelled with them."""
    ids = list(range(BYTE_TOKENS))
    if any(len(t) != 1 for t in tokenizer.convert_ids_to_tokens(ids)):
        raise ValueError("the tokenizer's first 256 ids are not byte-level tokens; compact_vocab needs a "
                         "byte-level BPE tokenizer such as Qwen2's")
    return ids


def build_ids(tokenizer, used: Iterable[int], *, multiple: int = 128) -> tuple[int, ...]:
    """Sorted tokenizer ids to keep: `used` + byte tokens + added special tokens, padded to `multiple`."""
    keep = set(int(i) for i in used) | set(byte_token_ids(tokenizer))
    keep |= set(int(i) for i in tokenizer.added_tokens_decoder)
    n_total = len(tokenizer)
    if max(keep) >= n_total:
        raise ValueError(f"token id {max(keep)} is outside the tokenizer ({n_total} ids)")
    target = min(n_total, -(-len(keep) // multiple) * multiple)
    filler = (i for i in range(n_total) if i not in keep)
    while len(keep) < target:
        keep.add(next(filler))
    return tuple(sorted(keep))


class CompactTokenizer:
    """A Hugging Face tokenizer whose ids are rows of a compact vocabulary (see module doc).

    Implements what the encoder, generation and scoring use — `__call__(text)["input_ids"]`,
    `convert_tokens_to_ids`, `decode`, `apply_chat_template(tokenize=False)` — and forwards the rest.
    """

    def __init__(self, tokenizer, vocab_ids):
        self.tok = tokenizer
        self.vocab_ids = np.asarray(vocab_ids, np.int64)
        self.row = {int(t): k for k, t in enumerate(self.vocab_ids)}
        if len(self.row) != len(self.vocab_ids):
            raise ValueError("vocab_ids has duplicate entries")

    def __getattr__(self, name):  # chat_template, added tokens, ... of the wrapped tokenizer
        return getattr(self.tok, name)

    def __len__(self) -> int:
        return len(self.vocab_ids)

    def to_rows(self, ids) -> list[int]:
        out = []
        for i in ids:
            k = self.row.get(int(i))
            if k is None:  # not kept: spell the token with its bytes
                spelled = list(self.tok.convert_ids_to_tokens(int(i)))
                out += [self.row[b] for b in self.tok.convert_tokens_to_ids(spelled)]
            else:
                out.append(k)
        return out

    def to_ids(self, rows) -> list[int]:
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self.vocab_ids)):
            raise ValueError(f"row {int(rows.max())} is outside the compact vocabulary ({len(self.vocab_ids)} rows)")
        return self.vocab_ids[rows].tolist()

    def __call__(self, text, **kw):
        out = self.tok(text, **kw)
        return {**out, "input_ids": self.to_rows(out["input_ids"])}

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.to_rows([self.tok.convert_tokens_to_ids(tokens)])[0]
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def decode(self, rows, **kw) -> str:
        return self.tok.decode(self.to_ids(rows), **kw)

    def apply_chat_template(self, messages, **kw):
        if kw.get("tokenize", True):
            raise ValueError("CompactTokenizer renders templates as text only (tokenize=False)")
        return self.tok.apply_chat_template(messages, **kw)


def tokenizer_for(tokenizer, vocab_ids):
    """The tokenizer a model with these `vocab_ids` (None: full vocabulary) reads and writes."""
    return tokenizer if vocab_ids is None else CompactTokenizer(tokenizer, vocab_ids)


def compact_config(cfg, vocab_ids):
    """`cfg` with its vocabulary cut to `vocab_ids`: vocab_size and every special id become rows."""
    import dataclasses

    row = {int(t): k for k, t in enumerate(vocab_ids)}

    def at(i, name):
        if i is None:
            return None
        if isinstance(i, (list, tuple)):
            return [at(j, name) for j in i]
        if int(i) not in row:
            raise ValueError(f"{name}={i} is not in the compact vocabulary")
        return row[int(i)]

    specials = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "bos_token_id",
                "eos_token_id")
    return cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(vocab_ids)),
                       vocab_ids=tuple(int(t) for t in vocab_ids),
                       **{k: at(getattr(cfg, k), k) for k in specials})
