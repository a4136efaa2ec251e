"""Output folders (dreampose.outputs): what the project may write into, markers, and nothing half-written."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dreampose.outputs import (
    MARKER,
    atomic_dir,
    check_output_dir,
    check_output_file,
    claim_output_dir,
    output_dir,
    read_marker,
)
from dreampose.utils import DreamPoseError


def test_a_new_or_empty_folder_or_the_commands_own_output_may_be_written(tmp_path):
    assert check_output_dir(tmp_path / "new", "cmd") is False
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", "cmd") is True
    claim_output_dir(tmp_path / "own", "cmd")
    assert read_marker(tmp_path / "own")["command"] == "cmd"
    (tmp_path / "own" / "result.txt").write_text("r")
    assert check_output_dir(tmp_path / "own", "cmd") is True


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), "holds files this command did not write"),
        (lambda p: claim_output_dir(p, "other"), "holds the output of `other`"),
        (lambda p: p.write_text("a file"), "is a file, not a folder"),
    ],
)
def test_anything_else_is_refused_and_left_as_it_was(tmp_path, make, message):
    target = tmp_path / "out"
    make(target)
    before = sorted(os.walk(tmp_path))
    with pytest.raises(DreamPoseError, match=message):
        check_output_dir(target, "cmd")
    with pytest.raises(DreamPoseError, match=message):
        with atomic_dir(target, "cmd") as tmp:
            (tmp / "new.txt").write_text("n")
    assert sorted(os.walk(tmp_path)) == before  # no temporary folder left beside it either


def test_an_output_is_never_an_input_nor_contains_one_nor_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "image.png").write_bytes(b"x")
    with pytest.raises(DreamPoseError, match="is an input"):
        check_output_dir(tmp_path / "inputs" / "image.png", "cmd", inputs=[tmp_path / "inputs" / "image.png"])
    with pytest.raises(DreamPoseError, match="contains an input"):
        check_output_dir(tmp_path / "inputs", "cmd", inputs=[tmp_path / "inputs" / "image.png"])
    with pytest.raises(DreamPoseError, match="is an input"):
        check_output_file(tmp_path / "inputs" / "image.png", inputs=[tmp_path / "inputs" / "image.png"])
    monkeypatch.chdir(tmp_path / "inputs")
    (tmp_path / "inputs" / MARKER).write_text(json.dumps({"command": "cmd"}))  # even the command's own folder
    with pytest.raises(DreamPoseError, match="working directory"):
        check_output_dir("..", "cmd")
    with pytest.raises(DreamPoseError, match="working directory"):
        check_output_dir(".", "cmd")
    assert check_output_dir("sub", "cmd") is False  # a new folder inside it is fine


def test_legacy_folders_of_the_command_count_as_its_own(tmp_path):
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "manifest.json").write_text("{}")
    with pytest.raises(DreamPoseError):
        check_output_dir(tmp_path / "engines", "build-engine")
    assert check_output_dir(tmp_path / "engines", "build-engine", legacy=lambda p: (p / "manifest.json").is_file())


def test_atomic_dir_replaces_its_own_output_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "cmd") as tmp:
        (tmp / "a.txt").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt"]
    with atomic_dir(out, "cmd") as tmp:  # its own output: replaced
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    with pytest.raises(RuntimeError):
        with atomic_dir(out, "cmd") as tmp:
            (tmp / "c.txt").write_text("3")
            raise RuntimeError("failed while writing")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]  # as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.*.tmp / .old left


def test_atomic_dir_puts_the_old_folder_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out, "cmd") as tmp:
        (tmp / "a.txt").write_text("1")
    real = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(out, "cmd") as tmp:
            (tmp / "b.txt").write_text("2")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_dir_removes_a_folder_it_created_when_the_block_fails_early(tmp_path):
    with pytest.raises(RuntimeError):
        with output_dir(tmp_path / "new", "cmd", scratch=("settings.json",)) as out:
            (out / "settings.json").write_text("{}")
            raise RuntimeError
    assert not (tmp_path / "new").exists()
    with pytest.raises(RuntimeError):
        with output_dir(tmp_path / "kept", "cmd") as out:
            (out / "frame_0.png").write_bytes(b"x")  # work worth keeping (a resumable render's frame)
            raise RuntimeError
    assert (tmp_path / "kept" / "frame_0.png").is_file()
    claim_output_dir(tmp_path / "existing", "cmd")
    with pytest.raises(RuntimeError):
        with output_dir(tmp_path / "existing", "cmd"):
            raise RuntimeError
    assert (tmp_path / "existing").is_dir()  # it did not create it: it stays


def test_an_existing_regular_file_may_be_replaced_but_not_a_folder_or_device(tmp_path):
    (tmp_path / "old.mp4").write_bytes(b"x")
    check_output_file(tmp_path / "old.mp4")
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(DreamPoseError, match="is a folder"):
        check_output_file(tmp_path / "dir.mp4")
    if os.path.exists("/dev/null"):
        with pytest.raises(DreamPoseError, match="not a regular file"):
            check_output_file("/dev/null")


def test_atomic_dir_makes_owner_only_files_readable_as_the_umask_says(tmp_path):
    """safetensors writes 0600: a model folder written through atomic_dir gets the modes of any file the user
    makes (0644 under umask 022), so other users, processes and cluster nodes can read it."""
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model", "test") as tmp:
            (tmp / "sub").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "weights.safetensors"))
            (tmp / "private.key").write_text("x")
            os.chmod(tmp / "private.key", 0o400)  # a mode chosen on purpose stays
    finally:
        os.umask(old)
    assert (tmp_path / "model" / "sub" / "weights.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model" / "private.key").stat().st_mode & 0o777 == 0o400
