"""A checkpoint's own preprocessor_config.json, honoured through the evaluation command: for each family, a
checkpoint whose processor differs from the family's published one (normalisation and pixel budget) is evaluated by
`python -m clinkd_jax.main` (eval stage, the checkpoint's budget: eval.min_pixels = eval.max_pixels = 0), and every
greedy answer equals transformers' (its image processor loaded from the same file, its model, `generate`). The
same answers under the family's default processor differ, so the test sees the file being read."""

import json
import os
import subprocess
import sys

import pytest
import tiny_model
from PIL import Image

from clinkd_jax import hf_checkpoint
from clinkd_jax.data import demo, markup, processor, text
from clinkd_jax.stage import StageContext

pytestmark = [pytest.mark.torch, pytest.mark.e2e]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 6
# unlike any family's: other normalisation, a budget that resizes the demo's 224 px images to at most 160 px
PROCESSOR = {"image_mean": [0.3, 0.2, 0.6], "image_std": [0.4, 0.15, 0.3], "min_pixels": 96 * 96,
             "max_pixels": 160 * 160}
CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    demo.generate(root, train_per_image=0, test_per_image=1, max_side=224)
    return root


def checkpoint_of(family: str, folder: str) -> str:
    """A tiny random model of `family` as a Hugging Face directory (full vocabulary, the real tokenizer, the run's
    template) with the processor file above."""
    c = tiny_model.eval_config(**{"model.family": family})
    c.seed = 5
    stage = StageContext.of(c, "")
    cfg, params = stage.load_model()
    template = stage.encoder.template or text.QWEN2VL_TEMPLATE
    hf_checkpoint.save_hf_checkpoint(params, cfg, folder, assets_from=text.bundled_qwen2_tokenizer_dir(),
                                     chat_template=template)
    with open(os.path.join(folder, processor.FILE), "w") as f:
        json.dump({**PROCESSOR, "patch_size": cfg.vision.patch_size, "merge_size": cfg.vision.spatial_merge_size,
                   "temporal_patch_size": cfg.vision.temporal_patch_size}, f)
    return folder


def transformers_answer(model, tok, template, image_processor, image_path: str, question: str) -> str:
    """What transformers generates for the question, as Qwen2-VL's processor builds the prompt."""
    import torch

    pixels = image_processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    grid = pixels["image_grid_thw"]
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": markup.to_qwen2vl(question)}]}]
    prompt = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    merge = image_processor.merge_size
    prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * int(grid.prod() // merge**2))
    ids = tok(prompt, return_tensors="pt")
    image_tokens = (ids["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).int()  # as the processor marks
    with torch.no_grad():
        out = model.generate(**ids, pixel_values=pixels["pixel_values"], image_grid_thw=grid,
                             mm_token_type_ids=image_tokens, max_new_tokens=NEW_TOKENS, do_sample=False)
    row = out[0, ids["input_ids"].shape[1]:].tolist()
    stops = [i for i, t in enumerate(row) if t in (151645, 151643)]
    return tok.decode(row[: stops[0] + 1] if stops else row, skip_special_tokens=False)


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_the_evaluation_feeds_the_checkpoint_s_processor(tmp_path, demo_dir, family):
    import transformers
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ckpt = checkpoint_of(family, str(tmp_path / "hf"))
    workdir = tmp_path / "eval"
    p = subprocess.run(
        [sys.executable, "-m", "clinkd_jax.main", "--config=configs/demo_eval.py", f"--workdir={workdir}",
         "--config.model.preset=", f"--config.model.hf_dir={ckpt}", f"--config.data.demo_dir={demo_dir}",
         "--config.eval.min_pixels=0", "--config.eval.max_pixels=0", "--config.data.mrope_gaps=(1, 1)",
         "--config.eval.tasks=('MII',)", "--config.eval.limit=3", "--config.eval.batch_size=2",
         f"--config.eval.max_new_tokens_mii={NEW_TOKENS}", "--config.eval.spice=False",
         "--config.eval.gallery_per_modality=0", "--config.train.progress=False"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}, capture_output=True, text=True,
        timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ours = [json.loads(x) for x in open(workdir / "predictions" / "Test_MII.jsonl")]

    model = getattr(transformers, CLASSES[family]).from_pretrained(ckpt, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    template = open(os.path.join(ckpt, "chat_template.jinja")).read()
    from_file = Qwen2VLImageProcessorPil.from_pretrained(ckpt)  # transformers reads the same file
    assert list(from_file.image_mean) == PROCESSOR["image_mean"]
    assert from_file.size.longest_edge == PROCESSOR["max_pixels"]
    family_default = Qwen2VLImageProcessorPil(patch_size=from_file.patch_size, merge_size=from_file.merge_size,
                                              temporal_patch_size=from_file.temporal_patch_size,
                                              image_mean=list(processor.FAMILY_DEFAULTS[family]["mean"]),
                                              image_std=list(processor.FAMILY_DEFAULTS[family]["std"]),
                                              min_pixels=processor.FAMILY_DEFAULTS[family]["min_pixels"],
                                              max_pixels=processor.FAMILY_DEFAULTS[family]["max_pixels"])
    differs = 0
    for item in ours:
        image = os.path.join(demo_dir, "images", item["image"])
        question = markup.strip_image_tag(item["question"])
        want = transformers_answer(model, tok, template, from_file, image, question)
        assert item["response"] == want, (family, item["image"])
        differs += want != transformers_answer(model, tok, template, family_default, image, question)
    assert len(ours) == 3 and differs >= 1, "the processor's settings change no answer: the test would not see them"
