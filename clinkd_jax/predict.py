"""Ask a model about one image, or every image of a folder.

    python -m clinkd_jax.predict --model=DIR --image=ct.dcm --task=vg --question="bright oval lesion" --out=ct.png
    python -m clinkd_jax.predict --model=DIR --image=x.png --task=ro --box=40,60,120,150
    python -m clinkd_jax.predict --model=DIR --images=FOLDER --task=mii --out=preds.jsonl

DIR is a Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory, a run's `params` (or `export_hf`) folder, or a
run's stage folder holding one. Tasks are Med-GRIT's, asked as its test files ask them (`markup.QUESTIONS`):
`vg` finds the object `--question` names, `ro` names the object in `--box`, `gc` describes the region in
`--box`, `mii` describes the image, `chat` asks `--question` as typed (BiRD markup allowed). Boxes are given in
pixels of the image (`--box_units=1000`: on Med-GRIT's 0-1000 scale) and answered in both.

The prompt is built, and the answer decoded, by the evaluation's own functions with the settings the model was
trained and evaluated with (`answer_settings.json` beside its params; else configs/base.py's, or `--config`), so
a `vg` answer here is the one evaluation would score. What the model writes is untrusted input: each box is listed
as written and ordered and clipped, or as not a box with the reason (`eval.answers`), and drawing cannot fail on it.
Every flag is checked before the model is loaded. One image prints one JSON object; a folder writes one JSON
line per image (a file that cannot be asked about gets a line with its `error`, and is counted), compiling once
per (prompt, image) bucket.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import jax
from absl import flags
from PIL import Image, ImageDraw

from clinkd_jax import checkpoint, cli, files
from clinkd_jax.data import image as image_lib
from clinkd_jax.data import markup
from clinkd_jax.data.records import Record, SkipLog, Turn
from clinkd_jax.errors import UserError
from clinkd_jax.eval import answers, metrics
from clinkd_jax.eval import run as eval_run
from clinkd_jax.infer import generate as gen_lib
from clinkd_jax.infer import prompts as prompts_lib
from clinkd_jax.model_source import ModelSource
from clinkd_jax.stage import StageContext

TASKS = ("vg", "ro", "gc", "mii", "chat")
BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.py")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") + image_lib.DICOM_SUFFIXES
OUT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # --out of one image
log = logging.getLogger("clinkd_jax.predict")


class AskError(UserError):
    """A question that cannot be asked (no object named, a box outside the image, an image too large)."""

    kind = "data"


@dataclasses.dataclass(frozen=True)
class Question:
    task: str  # one of TASKS
    question: str = ""  # vg: the object to find; chat: the question
    box: tuple[float, float, float, float] | None = None  # ro / gc: the region
    box_units: str = "pixels"  # "pixels" of the image as given | "1000" (Med-GRIT's scale)


def predict_config(model_dir: str, config_file: str = "", adapter: str = ""):
    """The run config the model is asked under: `config_file` (a run's config) or configs/base.py, updated with
    the settings saved beside the model (unless a config file was given), pointed at the model (with the PEFT
    LoRA `adapter` folded in as it loads, when one is named)."""
    if not config_file and not os.path.isfile(BASE_CONFIG):
        raise UserError(f"{BASE_CONFIG} not found (run from a clinkd_jax clone), or pass --config=<a run config>")
    c = cli.load_config_file(config_file or BASE_CONFIG)
    source = ModelSource.find(model_dir)
    where = source.where
    saved = os.path.join(where, checkpoint.ANSWER_SETTINGS)
    settings = None if config_file else files.read_json(saved)  # a torn one is named and set aside
    if isinstance(settings, dict):
        for part, fields in settings.items():
            for k, v in fields.items():
                if part in c and k in c[part]:
                    c[part][k] = tuple(v) if isinstance(c[part][k], tuple) else v
    elif not config_file:
        log.warning("%s has no %s: asking it with configs/base.py's prompt settings (MCG-RoPE gaps %s, eval "
                    "image budget); pass --config=<its run config> if it was trained otherwise", where,
                    checkpoint.ANSWER_SETTINGS, tuple(c.data.mrope_gaps))
    source.put(c.model)
    c.lora.adapter_dir = adapter
    c.model.compact_vocab = ""
    c.model.family = ""
    c.train.progress = False
    return c


def parse_numbers(text: str, n: int, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace("(", "").replace(")", "").split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise UserError(f"--{flag}={text}: expected {n} comma-separated numbers")
    return values


def box_1000(q: Question, size: tuple[int, int], where: str) -> tuple[int, int, int, int]:
    """`q.box` on the 0-1000 scale of an image of `size` = (height, width); an AskError naming the box if it is
    not a box inside the image."""
    x1, y1, x2, y2 = q.box
    h, w = (1000, 1000) if q.box_units == "1000" else size
    if not (x1 < x2 and y1 < y2):
        raise AskError(f"{where}: box {q.box} needs x1 < x2 and y1 < y2")
    if min(x1, y1) < 0 or x2 > w or y2 > h:
        unit = "on the 0-1000 scale" if q.box_units == "1000" else f"of a {w} x {h} px image"
        raise AskError(f"{where}: box {q.box} lies outside the image ({unit})")
    return tuple(int(round(v)) for v in (x1 / w * 1000, y1 / h * 1000, x2 / w * 1000, y2 / h * 1000))


def question_text(q: Question, size: tuple[int, int], where: str) -> str:
    """The question in BiRD markup, as a Med-GRIT test file asks it."""
    if q.task not in TASKS:
        raise AskError(f"task {q.task!r} is not one of {', '.join(TASKS)}")
    if q.task in ("vg", "chat") and not q.question.strip():
        raise AskError(f"task {q.task} needs a question: " + (
            "the object to find, e.g. --question='left kidney'" if q.task == "vg" else "what to ask"))
    if q.task in ("ro", "gc") and q.box is None:
        raise AskError(f"task {q.task} needs the region: --box=x1,y1,x2,y2")
    if q.task == "chat":
        return q.question.strip()
    box = markup.box_tag(box_1000(q, size, where)) if q.task in ("ro", "gc") else ""
    return markup.QUESTIONS[q.task.upper()].format(obj=q.question.strip(), box=box)


def read_image(path: str, window=None, max_megapixels: float = 40.0) -> Image.Image:
    """The image as the model reads it (DICOM windowed as in training, or with `window` = (center, width)); an
    ImageError naming the file for a missing, undecodable or over-large one (checked from its header first)."""
    h, w = image_lib.image_size(path)
    if h * w > max_megapixels * 1e6:
        raise image_lib.ImageError(f"{path}: {h * w / 1e6:.1f} megapixels ({w} x {h}) is more than the "
                                   f"{max_megapixels:g} allowed (--max_megapixels); downscale it first")
    return image_lib.load_image(path, window).convert("RGB")


def answer_of(response: str) -> str:
    """The readable answer: the released post-processing (spec §3.6) without a last end-of-turn token, Qwen2-VL's
    box tokens as BiRD markup."""
    return markup.to_bird(metrics.extract_information(response).replace("<|im_end|>", "")).strip()


def boxes_of(response: str, size: tuple[int, int]) -> list[dict]:
    """Every box the VG scorer finds in a response, as written and, when it can be one, ordered and clipped on the
    0-1000 scale and in pixels of an image of `size` = (height, width) with what was changed; else `not_a_box`
    with the reason (`eval.answers`)."""
    return [b.as_json(size) for b in answers.read_boxes(response)]


class Predictor:
    """A model loaded and placed once, asked about images in batches of its run's prompt buckets (one compile per
    bucket); `clinkd_jax.serve` keeps one for its page."""

    def __init__(self, model_dir: str, config_file: str = "", batch_size: int = 0, adapter: str = ""):
        self.c = c = predict_config(model_dir, config_file, adapter)
        stage = StageContext.of(c, "")  # no workdir: a checkpoint's vocabulary is its own, nothing is written
        cfg, params = stage.load_model()
        self.generator = gen_lib.Generator(stage.module(cfg), params, stage.mesh, stage.rules)
        self.encoder = stage.encoder
        width = stage.mesh.shape["data"] * stage.mesh.shape["fsdp"]  # the batch axes: a batch fills them
        rows = batch_size or c.eval.batch_size
        self.pcfg = eval_run.prompt_config(c, cfg, self.encoder, -(-rows // width) * width)
        self.model_dir = model_dir

    def ask(self, images: list[tuple[str, Image.Image]], q: Question) -> list[dict]:
        """One result per (name, image): `answer`, `boxes`, `response` (as a prediction file holds it), `question`,
        `task`, `seconds` (this call's, divided over its images); or `error` for an image it cannot be asked of."""
        start = time.perf_counter()
        results: list[dict | None] = [None] * len(images)
        recs = []
        for i, (name, img) in enumerate(images):
            try:
                text = question_text(q, (img.height, img.width), name)
            except AskError as e:
                results[i] = {"image": name, "task": q.task, "error": str(e)}
                continue
            recs.append(Record(id=name, images=(img,), turns=(Turn("user", text),), modality="", source=name,
                               index=i))
        skips = SkipLog(strict=False)
        sampling = eval_run.sampling_for(self.c, "MII" if q.task in ("mii", "chat") else q.task.upper(),
                                         self.encoder.stop_ids, self.encoder.pad_id)

        def skipped(r, reason):
            results[r.index] = {"image": r.id, "task": q.task, "error": f"{r.id}: {reason}"}

        batches = prompts_lib.prompt_batches(recs, self.encoder, self.pcfg, skips, on_skip=skipped)
        for k, (batch_recs, batch) in enumerate(batches):
            tokens = self.generator(batch, sampling, rng=jax.random.fold_in(jax.random.key(self.c.seed), k))
            for r, response in zip(batch_recs, eval_run.responses(tokens, batch_recs, self.encoder, self.pcfg)):
                img = r.images[0]
                answer = answer_of(response)
                results[r.index] = {"image": r.id, "task": q.task, "question": markup.to_bird(r.question),
                                    "answer": answer, "boxes": boxes_of(response, (img.height, img.width)),
                                    "response": response}
        seconds = (time.perf_counter() - start) / max(1, len(images))
        for r in results:
            r["seconds"] = round(seconds, 3)
        return results


def draw(img: Image.Image, result: dict, q: Question) -> Image.Image:
    """The image with the answer's boxes (red) and the asked region (green, ro / gc)."""
    out = img.convert("RGB")
    d = ImageDraw.Draw(out)
    line = max(2, round(max(out.size) / 200))
    if q.box is not None and q.task in ("ro", "gc"):
        x1, y1, x2, y2 = box_1000(q, (out.height, out.width), "box")
        d.rectangle([x1 * out.width / 1000, y1 * out.height / 1000, x2 * out.width / 1000, y2 * out.height / 1000],
                    outline=(0, 200, 0), width=line)
    for b in result.get("boxes", ()):
        if "pixels" in b:  # ordered and of positive area (`eval.answers`): drawing cannot fail on it
            d.rectangle(b["pixels"], outline=(230, 0, 0), width=line)
    return out


FLAGS = flags.FLAGS


def define_model_flags() -> None:
    """The flags `predict` and `serve` share (defined when either runs as the command, not on import)."""
    flags.DEFINE_string("model", None, "a Hugging Face directory, a run's params (or export_hf), or its stage "
                        "folder")
    flags.DEFINE_string("config", "", "a run config whose data/eval settings to ask with (default: those saved "
                        "with the model, else configs/base.py)")
    flags.DEFINE_float("max_megapixels", 40.0, "larger images are refused (decoded in memory first)")
    flags.DEFINE_string("adapter", "", "a PEFT LoRA adapter (a LoRA run's export_peft/, or one peft saved) folded "
                        "into --model as it loads")


def define_flags() -> None:
    define_model_flags()
    flags.DEFINE_string("image", None, "one image: PNG, JPEG, ... or DICOM")
    flags.DEFINE_string("images", None, "a folder: every image in it (with --out=FILE.jsonl)")
    flags.DEFINE_enum("task", None, TASKS, "vg: find --question | ro: name --box | gc: describe --box | "
                      "mii: describe the image | chat: ask --question")
    flags.DEFINE_string("question", "", "vg: the object to find; chat: the question")
    flags.DEFINE_string("box", None, "ro / gc: the region, x1,y1,x2,y2")
    flags.DEFINE_enum("box_units", "pixels", ("pixels", "1000"), "--box in pixels of the image, or on Med-GRIT's "
                      "0-1000 scale")
    flags.DEFINE_string("out", None, "--image: the image with the boxes drawn (.png); --images: the answers "
                        "(.jsonl)")
    flags.DEFINE_string("window", None, "DICOM: center,width (default: the file's own window; --images: applied "
                        "to its DICOM files)")
    flags.DEFINE_integer("batch_size", 0, "--images: images per generate call (default: eval.batch_size)")


def folder_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"--images={folder}: no such folder")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise AskError(f"--images={folder}: no images in it ({', '.join(IMAGE_SUFFIXES)})")
    return files


def check_window(path: str, window) -> None:
    """A DICOM window asked for an image that has none to apply it to is refused, not ignored."""
    if window is not None and not str(path).lower().endswith(image_lib.DICOM_SUFFIXES):
        raise AskError(f"{os.path.basename(path)}: a window (center,width) applies to DICOM files only")


# which tasks use a flag: given for another task it would be ignored, so it is refused
FLAG_TASKS = {"question": ("vg", "chat"), "box": ("ro", "gc"), "box_units": ("ro", "gc")}


def check_flags() -> tuple[Question, tuple[float, float] | None]:
    """Every flag checked before any work: the question and the DICOM window, or one line naming the flag."""
    if not FLAGS.model or not FLAGS.task or (FLAGS.image is None) == (FLAGS.images is None):
        raise UserError("give --model, --task and one of --image=FILE or --images=FOLDER")
    ModelSource.find(FLAGS.model)
    if FLAGS.config:
        cli.load_config_file(FLAGS.config)
    for flag, tasks in FLAG_TASKS.items():
        if FLAGS[flag].present and FLAGS[flag].value and FLAGS.task not in tasks:
            raise UserError(f"--{flag} is for task {' / '.join(tasks)}, not {FLAGS.task}: it would be ignored")
    if FLAGS.max_megapixels <= 0:
        raise UserError(f"--max_megapixels={FLAGS.max_megapixels:g}: must be positive")
    if FLAGS.batch_size < 0 or (FLAGS.batch_size and FLAGS.images is None):
        raise UserError(f"--batch_size={FLAGS.batch_size}: a positive number of images per call, with --images")
    if FLAGS.images is not None:
        if not FLAGS.out:
            raise UserError("--images answers go to a JSON-lines file: --out=FILE.jsonl")
        cli.writable(FLAGS.out, "out", suffixes=(".jsonl",))
    elif FLAGS.out:
        saved = tuple(e for e in OUT_IMAGE_SUFFIXES if e in Image.registered_extensions())
        cli.writable(FLAGS.out, "out", suffixes=saved)
    window = parse_numbers(FLAGS.window, 2, "window") if FLAGS.window else None
    if FLAGS.image is not None:
        check_window(FLAGS.image, window)
    box = parse_numbers(FLAGS.box, 4, "box") if FLAGS.box else None
    return Question(FLAGS.task, FLAGS.question, box, FLAGS.box_units), window


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    q, window = check_flags()
    paths = [FLAGS.image] if FLAGS.images is None else folder_images(FLAGS.images)
    if FLAGS.images is None:  # one image: its faults are the command's error, before the model is loaded
        img = read_image(paths[0], window, FLAGS.max_megapixels)
        question_text(q, (img.height, img.width), paths[0])
    predictor = Predictor(FLAGS.model, FLAGS.config, FLAGS.batch_size or (0 if FLAGS.images else 1), FLAGS.adapter)
    if FLAGS.images is None:
        result = predictor.ask([(paths[0], img)], q)[0]
        if FLAGS.out:
            files.save_image(FLAGS.out, draw(img, result, q))
            result["out"] = FLAGS.out
        print(json.dumps(result, ensure_ascii=False))
        return
    from tqdm.auto import tqdm

    errors, chunk = [], predictor.pcfg.batch_size * 8  # images decoded at a time (bounds host memory)
    with files.Lines(FLAGS.out, "w") as f, tqdm(total=len(paths), unit="image", desc=f"predict {q.task}") as bar:
        for start in range(0, len(paths), chunk):
            images, results = [], []
            for p in paths[start:start + chunk]:
                try:
                    images.append((p, read_image(p, window, FLAGS.max_megapixels)))
                except image_lib.ImageError as e:
                    results.append({"image": p, "task": q.task, "error": str(e)})
            results = predictor.ask(images, q) + results
            f.write(*(json.dumps(r, ensure_ascii=False) for r in results))
            errors += [r["error"] for r in results if "error" in r]
            bar.update(len(results))
    print(f"{len(paths) - len(errors)} of {len(paths)} images answered -> {FLAGS.out}; compiled "
          f"{predictor.generator.compiled} time(s)" + (f"; {len(errors)} not asked (their lines say why), e.g. "
                                                       f"{errors[0]}" if errors else ""))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
