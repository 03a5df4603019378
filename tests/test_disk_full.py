"""A full disk outside checkpoint saves, through the commands users run: the evaluation (predictions, stamps,
metrics, tables, charts, gallery), `predict` (one drawn image, a folder's answers), `convert` (an export), and our
own files left torn. Each full disk must end in one `disk error:` line naming the file and the space, exit status 2,
no traceback; the same command run again with room must finish as an uninterrupted run would (every prediction
once, metrics identical); a torn file of ours is named, set aside and made again.

The disk is a size-limited tmpfs in a private mount namespace (`unshare`, as tests/test_faults.py); its size is
set from an uninterrupted run's files, at several fractions, so the disk fills at different writes."""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_model
from test_faults import ROOT, SMALL, finish, in_namespace, main_command

from clinkd_jax.data import demo as demo_lib

pytestmark = pytest.mark.faults
PAGE = 4096
EVALUATE = ["--config.eval.tasks=('VG', 'RO')", "--config.eval.limit=6", "--config.eval.batch_size=2",
            "--config.eval.max_new_tokens=6", "--config.eval.spice=False"]


def pages(path) -> int:
    """What a file, or a folder's files, take on a tmpfs (whole pages)."""
    found = [path] if os.path.isfile(path) else glob.glob(f"{path}/**", recursive=True)
    return sum(-(-os.path.getsize(f) // PAGE) for f in found if os.path.isfile(f))


def on_a_small_disk(tmp_path, name: str, size: int, command: list[str], mount: str, grow: int) -> dict:
    """`command` with `mount` on a tmpfs of `size` bytes, then again with the tmpfs grown to `grow` bytes; what
    each run said and the files the second left (copied out to tmp_path/name/after)."""
    out, after = tmp_path / name, tmp_path / name / "after"
    out.mkdir()
    cmd = shlex.join(command)
    ran = in_namespace(f"""
        mkdir -p {mount} && mount -t tmpfs -o size={size} tmpfs {mount} || exit 97
        {cmd} > {out}/full.out 2> {out}/full.err; echo $? > {out}/full.rc
        mount -o remount,size={grow} {mount} || exit 98
        {cmd} > {out}/again.out 2> {out}/again.err; echo $? > {out}/again.rc
        mkdir -p {after} && cp -r {mount}/. {after}/
    """, ROOT)
    assert ran.returncode == 0, f"mount in a user namespace failed ({ran.returncode}): {ran.stderr[-2000:]}"
    return {k: (out / k).read_text() for k in ("full.out", "full.err", "full.rc", "again.out", "again.err",
                                               "again.rc")} | {"after": after}


def one_disk_error(said: dict) -> str:
    err = said["full.err"]
    assert said["full.rc"].strip() == "2", err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("disk error: ") and "no space left on " in line and " free" in line, line
    return line


def named(line: str) -> str:
    """The file or folder a disk error line names (its first absolute path)."""
    return re.search(r"(/[^\s:]+)", line).group(1)


def predictions(workdir, task):
    return sorted((json.loads(x) for x in open(os.path.join(workdir, "predictions", f"Test_{task}.jsonl"))),
                  key=lambda r: r["id"])


# what an evaluation writes, in order (a prediction file grows line by line)
WRITES = ["predictions/Test_VG.made_by.json", "predictions/Test_VG.jsonl", "predictions/Test_RO.made_by.json",
          "predictions/Test_RO.jsonl", "metrics.json", "tables/VG.md", "charts/VG.png", "gallery/VG.html",
          "tables/RO.md", "charts/RO.png", "gallery/RO.html", "results.md"]


def test_evaluation_fills_the_disk_at_several_writes_then_the_same_command_finishes(tmp_path):
    """The disk is sized to hold exactly the files written before a chosen one: the first prediction line, the
    metrics, the last gallery page. Each run stops with one line naming that file; the same command with room ends
    with the uninterrupted run's predictions, metrics and reports, and no temporary file left."""
    demo, ref = tmp_path / "demo", tmp_path / "ref"
    finish(main_command(ref, demo, *EVALUATE, config="configs/demo_eval.py"))
    assert sorted(WRITES) == sorted(os.path.relpath(f, ref) for f in glob.glob(f"{ref}/**", recursive=True)
                                    if os.path.isfile(f))
    for target in ("predictions/Test_VG.jsonl", "metrics.json", "gallery/RO.html"):
        run = tmp_path / f"run_{os.path.basename(target)}"
        before = sum(pages(ref / f) for f in WRITES[:WRITES.index(target)])
        said = on_a_small_disk(tmp_path, os.path.basename(target), before * PAGE,
                               main_command(run, demo, *EVALUATE, config="configs/demo_eval.py"), str(run),
                               grow=pages(ref) * PAGE * 4)
        assert one_disk_error(said).startswith(f"disk error: {run}/{target}: no space left"), target
        assert said["again.rc"].strip() == "0", said["again.err"][-3000:]
        after = said["after"]
        for task in ("VG", "RO"):  # every item once, as the uninterrupted run wrote it
            assert predictions(after, task) == predictions(ref, task), (target, task)
        got, want = (json.load(open(os.path.join(d, "metrics.json"))) for d in (after, ref))
        assert got["tasks"] == want["tasks"], target
        for name in ("results.md", "tables/VG.md", "charts/VG.png", "gallery/VG.html"):
            assert os.path.getsize(os.path.join(after, name)) == os.path.getsize(os.path.join(ref, name)), name
        assert not glob.glob(f"{after}/**/*.tmp", recursive=True) and not glob.glob(f"{after}/**/.*.tmp",
                                                                                    recursive=True)


def test_torn_files_of_ours_are_set_aside_and_made_again(tmp_path):
    """A run cut off mid-write on a file system without atomic rename (or a copy gone wrong) leaves an empty stamp,
    a truncated metrics.json and a torn prediction line: the same command names each, sets the unreadable ones
    aside, and ends as the uninterrupted run did."""
    demo, ref = tmp_path / "demo", tmp_path / "ref"
    finish(main_command(ref, demo, *EVALUATE, config="configs/demo_eval.py"))
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(ref), str(run)], check=True)
    (run / "predictions" / "Test_VG.made_by.json").write_text("")
    (run / "metrics.json").write_text((ref / "metrics.json").read_text()[:50])
    with open(run / "predictions" / "Test_RO.jsonl", "a") as f:
        f.write('{"id": 3, "image": "ct_')
    err = finish(main_command(run, demo, *EVALUATE, config="configs/demo_eval.py"))
    assert "Test_VG.made_by.json: unreadable (empty); set aside" in err
    assert "Test_RO.jsonl: dropping an unreadable line" in err
    assert (run / "predictions" / "Test_VG.made_by.json.unreadable").exists()
    for task in ("VG", "RO"):
        assert predictions(run, task) == predictions(ref, task), task
    assert json.load(open(run / "metrics.json"))["tasks"] == json.load(open(ref / "metrics.json"))["tasks"]


def test_predict_and_convert_on_a_full_disk(tmp_path):
    """predict's drawn image and a folder's answers, convert's export: one line each on a full disk; with room the
    same command writes them whole (the folder's answers each once, the export equal to one made with room)."""
    model = tiny_model.save(str(tmp_path / "model"))
    root = demo_lib.ensure(str(tmp_path / "demo"), train_per_image=0, test_per_image=1, max_side=112, seed=0)
    folder = os.path.join(root, "images")
    image = os.path.join(folder, sorted(os.listdir(folder))[0])
    disk = tmp_path / "disk"
    predict = [sys.executable, "-m", "clinkd_jax.predict", f"--model={model}", "--task=vg", "--question=cyst"]
    said = on_a_small_disk(tmp_path, "png", PAGE, predict + [f"--image={image}", f"--out={disk}/ct.png"],
                           str(disk), grow=64 * PAGE)
    assert one_disk_error(said).startswith(f"disk error: {disk}/ct.png: no space left")
    assert said["again.rc"].strip() == "0" and os.path.getsize(said["after"] / "ct.png") > 1000

    many = tmp_path / "many"  # answers for more than a page
    many.mkdir()
    for k in range(40):
        shutil.copy(os.path.join(folder, sorted(os.listdir(folder))[k % len(os.listdir(folder))]), many / f"{k}.png")
    want = tmp_path / "answers.jsonl"
    finish(predict + [f"--images={many}", f"--out={want}"])
    assert os.path.getsize(want) > 2 * PAGE  # the disk fills in the middle of the answers
    said = on_a_small_disk(tmp_path, "jsonl", PAGE, predict + [f"--images={many}", f"--out={disk}/answers.jsonl"],
                           str(disk), grow=64 * PAGE)
    assert one_disk_error(said).startswith(f"disk error: {disk}/answers.jsonl: no space left")
    assert said["again.rc"].strip() == "0", said["again.err"][-2000:]
    lines = [json.loads(x) for x in open(said["after"] / "answers.jsonl")]
    assert [x["response"] for x in lines] == [json.loads(x)["response"] for x in open(want)]  # each once

    roomy = tmp_path / "roomy"
    convert = [sys.executable, "-m", "clinkd_jax.convert", "orbax-to-hf", "--src", model]
    finish(convert + ["--dst", str(roomy)])
    said = on_a_small_disk(tmp_path, "convert", pages(roomy) // 2 * PAGE, convert + ["--dst", f"{disk}/hf"],
                           str(disk), grow=pages(roomy) * 4 * PAGE)
    one_disk_error(said)
    assert said["again.rc"].strip() == "0", said["again.err"][-2000:]
    for f in os.listdir(roomy):
        assert (said["after"] / "hf" / f).read_bytes() == (roomy / f).read_bytes(), f
    assert sorted(os.listdir(said["after"] / "hf")) == sorted(os.listdir(roomy))  # no side files left



def test_a_training_stage_whose_export_fills_the_disk(tmp_path):
    """A training stage with room for its checkpoints but not its Hugging Face export: one line naming the export;
    the same command with room resumes at the last step and writes the export whole, equal to an uninterrupted
    run's, with the same per-step metrics."""
    demo, ref, run = tmp_path / "demo", tmp_path / "ref", tmp_path / "run"
    export = ["--config.checkpoint.export_hf=True", "--config.model.compact_vocab="]  # a full vocabulary exports
    finish(main_command(ref, demo, *export))
    size = (pages(ref) - pages(ref / "export_hf") // 2) * PAGE
    said = on_a_small_disk(tmp_path, "train", size, main_command(run, demo, *export), str(run),
                           grow=pages(ref) * 3 * PAGE)
    assert one_disk_error(said).startswith(f"disk error: {run}/export_hf: no space left")
    assert said["again.rc"].strip() == "0", said["again.err"][-3000:]
    after = said["after"]
    assert sorted(os.listdir(after / "export_hf")) == sorted(os.listdir(ref / "export_hf"))
    for f in os.listdir(ref / "export_hf"):
        assert (after / "export_hf" / f).read_bytes() == (ref / "export_hf" / f).read_bytes(), f
    got, want = ([(s["step"], s["loss"]) for s in map(json.loads, open(d / "metrics.jsonl"))] for d in (after, ref))
    assert got == want  # each step once, the same losses


def test_the_pseudo_label_writer_on_a_full_disk(tmp_path):
    """The teacher's store (ArrayRecord shards, then index and meta) with room for half of it: one line naming the
    shard; with room, the same command writes the whole store, every record once."""
    demo, ref, run = tmp_path / "demo", tmp_path / "ref", tmp_path / "run"
    kd = ["--config.stage=kd", "--config.teacher.preset=tiny_qwen", f"--config.teacher.text_overrides={SMALL}",
          "--config.kd.top_k=4"]
    finish(main_command(ref, demo, *kd, module="clinkd_jax.train.pseudo_labels"))
    store = ref / "pseudo_labels"
    size = (pages(ref) - pages(store) // 2) * PAGE
    command = main_command(run, demo, *kd, module="clinkd_jax.train.pseudo_labels")
    said = on_a_small_disk(tmp_path, "store", size, command, str(run), grow=pages(ref) * 3 * PAGE)
    assert one_disk_error(said).startswith(f"disk error: {run}/pseudo_labels/shard-"), said["full.err"][-500:]
    assert said["again.rc"].strip() == "0", said["again.err"][-3000:]
    after = said["after"] / "pseudo_labels"
    meta, want = (json.load(open(d / "meta.json")) for d in (after, store))
    assert meta == want and meta["entries"] == meta["records"] > 0
    assert sorted(np.load(after / "index.npy")[:, 0].tolist()) == list(range(meta["records"]))  # each record once
