import functools

import pytest

from clinkd_jax.data import demo, text


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo.generate(str(out))
    return out


@functools.lru_cache(maxsize=None)
def chat_encoder():
    return text.ChatEncoder(text.load_tokenizer(text.bundled_qwen2_tokenizer_dir()), "qwen2vl")


@pytest.fixture(scope="session")
def encoder():
    return chat_encoder()
