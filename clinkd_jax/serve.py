"""A local web page for asking a model about an image: `python -m clinkd_jax.serve --model=DIR [--port=7860]`.

Upload a PNG, JPEG or DICOM (or click one of the demo images), pick the task, type the object or question or give
a box, and the answer comes back with its boxes drawn (red; the asked region green). The model is loaded and
compiled once (`predict.Predictor`); requests queue and run one at a time. What the page answers is what
`python -m clinkd_jax.predict` answers for the same inputs (one code path); a request it cannot answer (not an
image, a DICOM without pixels, an empty question, a box outside the image, an over-large image, a failure after the
model has answered) shows `error: <reason>` where the answer goes, the server logs one line, and the page goes on
serving. Every flag is checked before the model is loaded (a taken port included). Gradio's API serves the same
function as `/answer` (`gradio_client`).
"""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
import tempfile

from absl import flags

from clinkd_jax import cli, files, predict
from clinkd_jax.data import demo
from clinkd_jax.errors import UserError, one_line
from clinkd_jax.model_source import ModelSource

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the machines we run on may be closed

TASK_NAMES = {"vg": "find an object (visual grounding)", "ro": "name the object in a box", "gc": "describe a region",
              "mii": "describe the image", "chat": "ask anything"}
log = logging.getLogger("clinkd_jax.serve")


def answer_fn(predictor: predict.Predictor, max_megapixels: float = 40.0, verbose: bool = False):
    """(file, task, question, box, window) -> (image with boxes, answer, result): the page's one request. A request
    that cannot be answered comes back as `error: <reason>` where the answer goes (and `error` in the result), the
    server logs one line, and the next request is answered."""

    def refused(reason: str, name: str = ""):
        import gradio as gr

        log.info("request not answered%s: %s", f" ({name})" if name else "", reason)
        gr.Warning(reason)
        return None, f"error: {reason}", {"error": reason}

    def answer(file, task: str, question: str = "", box: str = "", window: str = ""):
        if not file:
            return refused("no image: upload a PNG, JPEG or DICOM file, or click an example")
        path = file if isinstance(file, str) else getattr(file, "name", None) or file["path"]
        name = os.path.basename(path)
        try:
            q = predict.Question(task, question or "", predict.parse_numbers(box, 4, "box") if box and box.strip()
                                 else None)
            win = predict.parse_numbers(window, 2, "window") if window and window.strip() else None
            predict.check_window(path, win)
            img = predict.read_image(path, win, max_megapixels)
            result = predictor.ask([(name, img)], q)[0]
            if "error" in result:
                return refused(result["error"], name)
            drawn = predict.draw(img, result, q)
            room = room_for(drawn)  # gradio writes the picture to its cache: a full disk is this request's message
            if room:
                return refused(room, name)
            return drawn, result["answer"], result
        except UserError as e:  # said with the uploaded file's name, not the server's copy of it
            return refused(str(e).replace(path, name), name)
        except Exception as e:  # a bug: this request says so in one line; the page goes on serving
            if verbose:
                log.exception("request failed (%s)", name)
            return refused(f"failed: {type(e).__name__}: {e} (a bug; the server's --verbose log has the traceback)"
                           .replace(path, name), name)

    return answer


def room_for(img) -> str:
    """"" if gradio's cache (where it writes each answered picture) has room for `img` as PNG, else the one-line
    disk error to answer with."""
    cache = os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")
    free = files.free_bytes(cache)
    if free is None or free >= img.width * img.height * 4 + 65536:  # more than any PNG of it: no encoding needed
        return ""
    png = io.BytesIO()  # little room: the picture's own size decides
    img.save(png, format="PNG")
    need = len(png.getvalue()) + 4096  # and a page for its name
    return "" if free >= need else one_line(files.disk_full(cache, need))


def examples(folder: str) -> list[list[str]]:
    """One demo test image per source, with a question of each task (the demo's objects and regions)."""
    root = demo.ensure(folder, train_per_image=0, test_per_image=1, max_side=224, seed=0)
    images = sorted(os.listdir(os.path.join(root, "images")))
    tasks = ("vg", "mii", "ro", "gc")
    out = []
    for i, name in enumerate(images[:4]):
        task = tasks[i % len(tasks)]
        path = os.path.join(root, "images", name)
        out.append([path, task, demo.OBJECTS[i % 2] if task == "vg" else "",
                    "20,20,150,150" if task in ("ro", "gc") else "", ""])
    return out


def build_page(predictor: predict.Predictor, examples_dir: str, max_megapixels: float = 40.0,
               verbose: bool = False):
    import gradio as gr

    with gr.Blocks(title="clinkd_jax") as page:
        gr.Markdown(f"### clinkd_jax: ask a model about an image\nModel: `{predictor.model_dir}`. Boxes are in pixels "
                    "of the image (x1,y1,x2,y2); answers are drawn in red, the region you give in green.")
        with gr.Row():
            with gr.Column():
                file = gr.File(label="Image (PNG, JPEG or DICOM)", type="filepath", elem_id="image-file")
                task = gr.Dropdown([(name, key) for key, name in TASK_NAMES.items()], value="vg", label="Task",
                                   elem_id="task")
                question = gr.Textbox(label="Object to find (vg) or question (chat)", elem_id="question")
                box = gr.Textbox(label="Region for ro / gc: x1,y1,x2,y2 in pixels", elem_id="box")
                window = gr.Textbox(label="DICOM window: center,width (optional)", elem_id="window")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                shown = gr.Image(label="Answer drawn", type="pil", elem_id="drawn", format="png")
                text = gr.Textbox(label="Answer", elem_id="answer")
                details = gr.JSON(label="Result")
        gr.Examples(examples(examples_dir), inputs=[file, task, question, box, window], label="Demo images")
        ask.click(answer_fn(predictor, max_megapixels, verbose), inputs=[file, task, question, box, window],
                  outputs=[shown, text, details], api_name="answer", concurrency_limit=1)
    return page.queue(default_concurrency_limit=1)


FLAGS = flags.FLAGS


def define_flags() -> None:
    predict.define_model_flags()
    flags.DEFINE_integer("port", 7860, "local port")
    flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    flags.DEFINE_string("examples_dir", os.path.join(tempfile.gettempdir(), "clinkd_jax_demo_examples"),
                        "where the demo example images are written")


def check_flags() -> None:
    """Every flag checked before the model is loaded, one line each."""
    if not FLAGS.model:
        raise UserError("give --model=DIR (a Hugging Face directory, a run's params, or its stage folder)")
    ModelSource.find(FLAGS.model)
    if FLAGS.config:
        cli.load_config_file(FLAGS.config)
    if FLAGS.max_megapixels <= 0:
        raise UserError(f"--max_megapixels={FLAGS.max_megapixels:g}: must be positive")
    if not 1 <= FLAGS.port <= 65535:
        raise UserError(f"--port={FLAGS.port}: not a port (1-65535)")
    try:  # taken or not ours to take: said now, not after minutes of loading and compiling
        with socket.socket(socket.AF_INET6 if ":" in FLAGS.host else socket.AF_INET) as s:
            s.bind((FLAGS.host, FLAGS.port))
    except OSError as e:
        raise UserError(f"--host={FLAGS.host} --port={FLAGS.port}: cannot listen there ({e.strerror or e})") from None
    cli.writable(FLAGS.examples_dir, "examples_dir", folder=True)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax", "orbax", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    check_flags()
    predictor = predict.Predictor(FLAGS.model, FLAGS.config, 1, FLAGS.adapter)
    page = build_page(predictor, FLAGS.examples_dir, FLAGS.max_megapixels, FLAGS.verbose)
    first = examples(FLAGS.examples_dir)[0]  # compiled before the first visitor asks (demo-sized images)
    predictor.ask([("warm-up", predict.read_image(first[0]))], predict.Question("vg", demo.OBJECTS[0]))
    log.info("serving %s on http://%s:%d", FLAGS.model, FLAGS.host, FLAGS.port)
    page.launch(server_name=FLAGS.host, server_port=FLAGS.port, ssr_mode=False, show_error=True,
                footer_links=["api"], allowed_paths=[FLAGS.examples_dir])


if __name__ == "__main__":
    define_flags()
    cli.run(main)
