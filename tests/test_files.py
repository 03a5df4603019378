"""clinkd_jax.files, the one way every command writes: whole files atomically, growing files by whole lines, a full
disk as one DiskFull naming the file and the space, our own torn files named, set aside and reported missing.
The full disk is injected here (ENOSPC from the write, the fsync); tests/test_disk_full.py fills real disks
through the commands."""

import errno
import json
import logging
import os

import pytest
from PIL import Image

from clinkd_jax import files


def enospc(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_failed_whole_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, where):
    path = tmp_path / "metrics.json"
    files.write_json(str(path), {"v": 1})
    if where == "write":
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FailingFile(fd))
    else:
        monkeypatch.setattr(os, where, enospc)
    with pytest.raises(files.DiskFull, match=r"metrics.json: no space left on the device \(.* free, needed 10 B\)"):
        files.write_json(str(path), {"v": 22}, indent=None)
    monkeypatch.undo()
    assert json.load(open(path)) == {"v": 1} and os.listdir(tmp_path) == ["metrics.json"]


class _FailingFile:
    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def write(self, data):
        enospc()


def test_lines_keep_whole_lines_through_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "preds.jsonl"
    real = os.write
    with files.Lines(str(path)) as f:
        f.write_json({"id": 0})

        def half(fd, data):  # half of the line gets out, then the disk is full
            if len(data) > 4:
                return real(fd, bytes(data[: len(data) // 2]))
            enospc()

        monkeypatch.setattr(os, "write", half)
        with pytest.raises(files.DiskFull, match="preds.jsonl: no space left"):
            f.write_json({"id": 1, "response": "a long answer"})
        monkeypatch.setattr(os, "write", real)
        f.write_json({"id": 2})
    assert [json.loads(x) for x in open(path)] == [{"id": 0}, {"id": 2}]


@pytest.mark.parametrize("content", ["", "   \n", '{"model": {"hf_dir": "x"', "\xff\xfe", "[1, 2"])
def test_a_torn_file_of_ours_is_named_set_aside_and_reported_missing(tmp_path, caplog, content):
    path = tmp_path / "Test_VG.made_by.json"
    path.write_bytes(content.encode("latin-1"))
    with caplog.at_level(logging.WARNING, "clinkd_jax.files"):
        assert files.read_json(str(path), "missing") == "missing"
    assert not path.exists() and (tmp_path / "Test_VG.made_by.json.unreadable").read_bytes() == content.encode(
        "latin-1")
    assert "Test_VG.made_by.json: unreadable" in caplog.text and "set aside" in caplog.text
    path.write_text("[1]")
    assert files.read_json(str(path)) == [1]
    path.write_text("")
    files.read_json(str(path))
    assert (tmp_path / "Test_VG.made_by.json.unreadable-2").exists()  # an earlier one is kept too


def test_read_lines_drops_a_torn_last_line_and_rewrites(tmp_path, caplog):
    path = tmp_path / "eval_curve.jsonl"
    path.write_text('{"step": 2}\n{"step": 4}\n{"st')
    with caplog.at_level(logging.WARNING, "clinkd_jax.files"):
        assert files.read_lines(str(path)) == [{"step": 2}, {"step": 4}]
    assert path.read_text() == '{"step": 2}\n{"step": 4}\n' and "dropped 1 unreadable line" in caplog.text


def test_images_and_copies_are_whole(tmp_path):
    img = Image.new("RGB", (9, 7), (1, 2, 3))
    for name in ("a.png", "b.jpg", "c.tiff"):
        files.save_image(str(tmp_path / name), img)
        assert Image.open(tmp_path / name).size == (9, 7)
    files.copy_file(str(tmp_path / "a.png"), str(tmp_path / "sub" / "a.png"))
    assert (tmp_path / "sub" / "a.png").read_bytes() == (tmp_path / "a.png").read_bytes()


def test_a_full_disk_is_recognised_in_a_chain_and_in_library_text():
    try:
        try:
            enospc()
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as e:
        assert files.is_disk_full(e)
    assert files.is_disk_full(ValueError("TensorStore: writing ... No space left on device [OS error 28]"))
    assert not files.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert files.size_text(3 * 2**20) == "3.0 MiB" and files.size_text(None) == "unknown"
