"""Bad and unusual input across the command line, table-driven: each case's exit code, its one line, and
that nothing outside the case's own folder was written and no file that was there changed.

Every case runs `dreampose-rt` in-process (main()) in a fresh workspace (the working directory) holding a
subject image, a pose file, a user's folder with a note and a copy of the tiny model folder. Where the
fix is a refusal, the case also runs the way forward its message gives.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from dreampose.outputs import MARKER
from dreampose_rt.cli import main


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: path -> content hash (files) or 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def ws(tmp_path, monkeypatch, subject_image, pose_seq, tiny_model_dir):
    """A workspace: subject.png, poses.npy (3 frames), posedir/ (3 frame_<n>_densepose.npy), keep/notes.txt,
    model/ (the tiny model); the working directory is the workspace."""
    Image.fromarray(subject_image).save(tmp_path / "subject.png")
    np.save(tmp_path / "poses.npy", pose_seq[:3])
    (tmp_path / "posedir").mkdir()
    for i in range(3):
        np.save(tmp_path / "posedir" / f"frame_{i}_densepose.npy", pose_seq[i])
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("x")
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    return tmp_path


RENDER = ["animate", "--image", "subject.png", "--poses", "poses.npy", "--model", "model", "--steps", "2", "--quiet"]
DEMO = ["animate", "--frames", "0:2", "--steps", "2", "--quiet"]


def _safetensors_edit(path: Path, edit: Callable[[dict], dict]) -> None:
    from safetensors.torch import load_file, save_file

    save_file(edit(load_file(str(path))), str(path))


def _nan_in_unet(ws: Path) -> None:
    def edit(state: dict) -> dict:
        state["conv_in.weight"][0, 0, 0, 0] = float("nan")
        return state

    _safetensors_edit(ws / "model/unet/diffusion_pytorch_model.safetensors", edit)


def _drop(path: str, key: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        _safetensors_edit(ws / path, lambda s: {k: v for k, v in s.items() if k != key})

    return setup


def _truncate(ws: Path) -> None:
    p = ws / "model/unet/diffusion_pytorch_model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])


def _empty_unet(ws: Path) -> None:
    shutil.rmtree(ws / "model/unet")
    (ws / "model/unet").mkdir()


def _json_edit(path: str, **changes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        data = json.loads((ws / path).read_text())
        data.update(changes)
        (ws / path).write_text(json.dumps(data))

    return setup


def _file(name: str, content: bytes = b"x") -> Callable[[Path], None]:
    return lambda ws: (ws / name).write_bytes(content)


def _workdir_of_another_render(ws: Path) -> None:
    work = ws / "o.mp4.work"
    work.mkdir()
    (work / MARKER).write_text(json.dumps({"command": "animate"}))
    (work / "settings.json").write_text(json.dumps({"seed": 99}))


@dataclass
class Case:
    name: str
    argv: list[str]
    code: int
    message: str = ""  # in the one error line (exit 2); empty for exit 0
    setup: Callable[[Path], None] | None = None
    then: list[str] | None = None  # the way forward: this command must then exit 0
    may_write: tuple[str, ...] = ()  # what the case itself may create (exit 0)
    skip: str = ""


CASES = [
    # 1. data loss: an output folder that holds what the command did not write is refused, untouched
    Case("png-out-into-a-users-folder", DEMO + ["--out", "keep"], 2, "holds files this command did not write",
         then=DEMO + ["--out", "keep/render"]),
    Case("out-is-the-working-folder", DEMO + ["--out", "../{ws_name}"], 2, "working directory",
         then=DEMO + ["--out", "render"]),
    Case("out-is-an-input", ["animate", "--image", "subject.png", "--poses", "posedir", "--model", "model", "--steps",
                             "2", "--quiet", "--out", "posedir"], 2, "is an input of this command",
         then=RENDER + ["--out", "frames"]),
    Case("out-contains-an-input", RENDER + ["--out", "."], 2, "contains an input"),
    Case("out-is-a-file", DEMO + ["--out", "keep/notes.txt"], 2, "is a file, not a folder"),
    Case("out-is-a-device", DEMO + ["--out", "/dev/null"], 2, "is a file, not a folder"),
    Case("video-out-is-a-folder", DEMO + ["--out", "keep.mp4"], 2, "is a folder",
         setup=lambda ws: (ws / "keep.mp4").mkdir()),
    Case("video-out-is-the-image", ["animate", "--image", "subject.gif", "--poses", "poses.npy", "--out", "subject.gif"],
         2, "is an input", setup=lambda ws: Image.open(ws / "subject.png").save(ws / "subject.gif")),
    Case("synth-data-into-a-users-folder", ["synth-data", "--out", "keep", "--videos", "1", "--frames", "2"], 2,
         "holds files this command did not write", then=["synth-data", "--out", "synth", "--videos", "1", "--frames", "2"]),
    Case("finetune-into-a-users-folder", ["finetune", "--image", "subject.png", "--poses", "pose0.npy", "--base", "model",
                                          "--out", "keep", "--unet-steps", "1", "--decoder-steps", "1"], 2,
         "holds files this command did not write", setup=lambda ws: np.save(ws / "pose0.npy", np.load(ws / "poses.npy")[0])),
    Case("finetune-over-its-base", ["finetune", "--image", "subject.png", "--base", "model", "--out", "model"], 2,
         "is an input"),
    Case("import-release-into-a-users-folder", ["import-release", "--unet", "u.pth", "--adapter", "a.pth", "--sd", "sd",
                                                "--clip", "clip", "--out", "keep"], 2, "holds files this command did not write"),
    Case("build-engine-into-a-users-folder", ["build-engine", "--model", "model", "--out", "keep"], 2,
         "holds files this command did not write"),
    Case("evaluate-into-a-users-folder", ["evaluate", "--model", "model", "--out", "keep", "--videos", "1"], 2,
         "holds files this command did not write"),
    Case("train-into-a-users-folder", ["train", "--out", "keep", "--max-steps", "1"], 2,
         "holds files this command did not write"),
    Case("prepare-data-into-a-users-folder", ["prepare-data", "--videos", "v.mp4", "--out", "keep"], 2,
         "holds files this command did not write", setup=_file("v.mp4")),
    # 2. settings checked before anything is written
    Case("frames-per-batch-0", DEMO + ["--frames-per-batch", "0", "--out", "o.mp4"], 2, "frames_per_batch must be >= 1",
         then=DEMO + ["--out", "o.mp4"]),
    Case("steps-1001", DEMO + ["--steps", "1001", "--out", "o.mp4"], 2, "steps must be between 1 and 1000",
         then=DEMO + ["--out", "o.mp4"]),
    Case("fps-0", DEMO + ["--fps", "0", "--out", "o.mp4"], 2, "fps must be a positive number"),
    Case("fps-tiny-gif", DEMO + ["--fps", "1e-9", "--out", "o.gif"], 2, "outside what a .gif can play"),
    Case("a-work-folder-without-frames-never-blocks", DEMO + ["--out", "o.mp4"], 0, setup=_workdir_of_another_render,
         may_write=("o.mp4", "o.mp4.work")),
    # 3. silent wrong output: broken weights are refused at load, naming the tensor
    Case("nan-in-the-unet", RENDER + ["--out", "o.mp4"], 2, "tensor conv_in.weight holds non-finite values",
         setup=_nan_in_unet),
    Case("clip-missing-a-tensor", RENDER + ["--out", "o.mp4"], 2, "1 missing keys: post_layernorm.bias",
         setup=_drop("model/image_encoder/model.safetensors", "post_layernorm.bias")),
    Case("unet-missing-a-tensor", RENDER + ["--out", "o.mp4"], 2, "missing keys: conv_out.bias",
         setup=_drop("model/unet/diffusion_pytorch_model.safetensors", "conv_out.bias")),
    Case("prepare-data-max-frames-0", ["prepare-data", "--videos", "v.mp4", "--out", "d", "--max-frames", "0"], 2,
         "--max-frames: must be an integer >= 1", setup=_file("v.mp4")),
    Case("train-max-steps-0", ["train", "--out", "r", "--max-steps", "0"], 2, "--max-steps: must be an integer >= 1"),
    Case("synth-data-fps-negative", ["synth-data", "--out", "s", "--fps", "-1"], 2, "fps must be > 0"),
    # 4. the user's input or machine: exit 2 with one line, never "internal error"
    Case("truncated-safetensors", RENDER + ["--out", "o.mp4"], 2, "not a readable safetensors file", setup=_truncate),
    Case("empty-unet-folder", RENDER + ["--out", "o.mp4"], 2, "no config.json", setup=_empty_unet),
    Case("config-field-of-the-wrong-type", RENDER + ["--out", "o.mp4"], 2, "field height must be int, got '64'",
         setup=_json_edit("model/dreampose.json", height="64")),
    Case("unet-config-disagrees-with-its-weights", RENDER + ["--out", "o.mp4"], 2, "conv_in.weight: checkpoint",
         setup=_json_edit("model/unet/config.json", in_channels=16)),
    Case("unet-config-field-of-the-wrong-type", RENDER + ["--out", "o.mp4"], 2, "not a valid UNet config",
         setup=_json_edit("model/unet/config.json", block_out_channels="wide")),
    Case("device-banana", DEMO + ["--device", "banana", "--out", "o.mp4"], 2, "'banana' is not a device"),
    Case("device-mps", DEMO + ["--device", "mps", "--out", "o.mp4"], 2, "runs on cpu or cuda, not mps"),
    Case("evaluate-on-cuda-without-cuda", ["evaluate", "--out", "e", "--device", "cuda"], 2, "no CUDA device",
         skip="this machine has CUDA" if torch.cuda.is_available() else ""),
    Case("train-lr-nan", ["train", "--out", "r", "--lr", "nan"], 2, "lr must be finite"),
    Case("train-num-workers-negative", ["train", "--out", "r", "--num-workers", "-1"], 2, "num_workers must be >= 0"),
    Case("image-is-a-folder", ["animate", "--image", "keep", "--poses", "poses.npy", "--out", "o.mp4"], 2,
         "is a folder; --image takes one image file"),
    Case("garbage-pth", ["import-release", "--unet", "u.pth", "--adapter", "u.pth", "--sd", "model", "--clip",
                         "model/image_encoder", "--out", "new"], 2, "u.pth: cannot read as a PyTorch state dict",
         setup=_file("u.pth", b"garbage" * 10)),
    Case("broken-mp4", ["prepare-data", "--videos", "v.mp4", "--out", "d"], 2, "v.mp4: cannot open the video",
         setup=_file("v.mp4", b"garbage" * 100)),
    Case("unknown-option", ["animate", "--bogus"], 2, "unrecognized arguments: --bogus"),
    Case("invalid-choice", ["build-engine", "--model", "m", "--out", "o", "--precision", "fp8"], 2,
         "invalid choice: 'fp8'"),
]


def _fill(argv: list[str], ws: Path) -> list[str]:
    return [a.format(ws_name=ws.name) for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_cleanly(case: Case, ws: Path, tiny_model_dir, capsys):
    if case.skip:
        pytest.skip(case.skip)
    if case.setup is not None:
        case.setup(ws)
    before, model_before = snapshot(ws), snapshot(tiny_model_dir)
    code = main(_fill(case.argv, ws))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == case.code, err
    after = snapshot(ws)
    if case.code == 2:
        assert len(err) == 1 and ": error: " in err[0], err  # one line, and not an internal error
        assert case.message in err[0], err
        assert after == before, "a refused command wrote or changed files"
    else:
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        assert {c.split("/")[0] for c in changed} <= set(case.may_write), changed
        assert all(before[k] == after[k] for k in before if k.split("/")[0] not in case.may_write)
    assert snapshot(tiny_model_dir) == model_before
    if case.then is not None:  # the way forward the message gives works
        assert main(_fill(case.then, ws)) == 0, capsys.readouterr().err


def test_a_read_only_or_full_disk_is_the_users_machine(capsys):
    """OSErrors of the machine (ENOSPC, EROFS, EACCES) exit 2 with one line naming the file; others are
    internal errors (exit 1)."""
    import argparse

    from dreampose_rt.cli import run_command

    for code, text in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")):
        parser = argparse.ArgumentParser()
        parser.set_defaults(func=lambda args, code=code, text=text: (_ for _ in ()).throw(OSError(code, text, "o.mp4")))
        assert run_command(parser, []) == 2
        assert capsys.readouterr().err.strip() == f"dreampose-rt: error: {text}: o.mp4"
    parser = argparse.ArgumentParser()
    parser.set_defaults(func=lambda args: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad file descriptor")))
    assert run_command(parser, []) == 1
    assert "internal error" in capsys.readouterr().err


def test_debug_and_quiet_work_before_the_subcommand(ws, capsys):
    with pytest.raises(Exception, match="image not found"):
        main(["--debug", "animate", "--image", "missing.png", "--poses", "poses.npy"])
    assert main(["--quiet", "animate", "--frames", "0:1", "--steps", "1", "--out", "q.mp4"]) == 0
    assert capsys.readouterr().err.strip() == ""  # no progress bar, no INFO lines


def test_restart_clears_a_work_folder_of_another_render(ws, capsys):
    work = ws / "o.mp4.work"
    work.mkdir()
    (work / MARKER).write_text(json.dumps({"command": "animate"}))
    (work / "settings.json").write_text(json.dumps({"seed": 99}))
    Image.new("RGB", (48, 64)).save(work / "frame_00000.png")
    assert main(DEMO + ["--out", "o.mp4"]) == 2
    assert "holds frames of another render" in capsys.readouterr().err
    assert (work / "frame_00000.png").is_file()
    assert main(DEMO + ["--out", "o.mp4", "--restart"]) == 0
    assert (ws / "o.mp4").is_file() and not work.exists()


def test_a_corrupt_frame_in_the_work_folder_is_rendered_again(ws, tiny_model_dir, subject_image, pose_seq):
    """A frame that does not read back (a truncated PNG) is rendered again; the result equals a fresh render."""
    import dreampose_rt.animate as animate
    from dreampose.settings import SamplingSettings
    from dreampose.video import frame_name, read_png
    from dreampose_rt.runtime import Runtime

    rt = Runtime.from_pretrained(tiny_model_dir, backend="torch", device="cpu")
    settings = SamplingSettings.for_model(rt.config, steps=2, noise="per-frame")
    out = ws / "pngs"
    real = animate.write_png

    def interrupt_after_two(frame, path, calls=[0]):  # noqa: B006
        real(frame, path)
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt

    animate.write_png = interrupt_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            animate.render_to_file(rt, out, pose_seq[:3], subject_image, settings, progress=False)
    finally:
        animate.write_png = real
    broken = animate.work_folder(out) / frame_name(0)
    broken.write_bytes(broken.read_bytes()[:40])
    report = animate.render_to_file(rt, out, pose_seq[:3], subject_image, settings, progress=False)
    assert report.resumed == 1 and report.rendered == 2
    fresh = rt.render(pose_seq[:3], subject_image, settings=settings)
    assert all(np.array_equal(read_png(out / frame_name(i)), fresh[i]) for i in range(3))


# --------------------------------------------------------------------------------------------------
# The Python API: every bad argument is a DreamPoseError that names it
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rt(tiny_model_dir):
    from dreampose_rt.runtime import Runtime

    return Runtime.from_pretrained(tiny_model_dir, backend="torch", device="cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(poses=[]), "poses list is empty"),
        (dict(poses=None), "poses must be a path, an array"),
        (dict(frames=[]), "frames is empty"),
        (dict(frames=[0.5]), "integer frame indices, got 0.5"),
        (dict(guidance=3.0), "unknown sampling setting(s) guidance"),
        (dict(steps=0), "steps must be between 1 and 1000"),
        (dict(s_image=float("inf")), "s_image must be finite"),
        (dict(frames_per_batch=0), "frames_per_batch must be >= 1"),
    ],
)
def test_render_arguments_are_named(rt, subject_image, pose_seq, kwargs, message):
    from dreampose.utils import DreamPoseError

    args = {"poses": pose_seq[:2], "image": subject_image, "steps": 1, **kwargs}
    with pytest.raises(DreamPoseError) as info:
        rt.render(**args)
    assert message in str(info.value)


def test_from_pretrained_arguments_are_named(tiny_model_dir):
    from dreampose.utils import DreamPoseError
    from dreampose_rt.runtime import Runtime

    for kwargs, message in ((dict(model_dir=123), "model_dir must be a folder path"),
                            (dict(model_dir=tiny_model_dir, device="banana"), "'banana' is not a device"),
                            (dict(model_dir=tiny_model_dir, backend="torch", colour="red"),
                             "unknown option(s) colour for the torch backend")):
        with pytest.raises(DreamPoseError) as info:
            Runtime.from_pretrained(**kwargs)
        assert message in str(info.value)


def test_a_list_of_pose_arrays_renders_like_the_array(rt, subject_image, pose_seq):
    as_array = rt.render(pose_seq[:2], subject_image, steps=1)
    as_list = rt.render([pose_seq[0], torch.from_numpy(pose_seq[1])], subject_image, steps=1)
    assert np.array_equal(as_array, as_list)


def test_a_16_bit_greyscale_png_keeps_its_values(tmp_path):
    from dreampose.images import load_image

    grey = np.linspace(0, 65535, 64 * 48).reshape(64, 48).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    x = load_image(tmp_path / "g16.png")
    expected = torch.from_numpy(grey.astype(np.float32) / 65535 * 2 - 1)
    assert torch.allclose(x[0, 0], expected, atol=1e-6) and torch.equal(x[0, 0], x[0, 2])


def test_the_cli_help_loads_no_torch_and_every_subcommand_answers():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dreampose_rt.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert [line for line in proc.stderr.splitlines() if "torch" in line] == []
    from dreampose_rt.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) >= {"animate", "evaluate", "import-release", "build-engine", "train", "finetune",
                             "synth-data", "prepare-data"}
    for name, sub in commands.items():
        text = sub.format_help()
        assert sub.description, f"{name} has no description"
        undocumented = [a.option_strings[0] for a in sub._actions if a.option_strings and not a.help]
        assert not undocumented, f"{name}: options without help: {undocumented}"
        assert "usage:" in text


def test_the_progress_bar_ends_at_its_total(rt, subject_image, pose_seq):
    """1 frame x 11 UNet calls: a sum of 11 increments of 1/11 overshoots 1.0 in floating point, which tqdm
    clamps with a warning (and shows a negative ETA); the bar's position is set from integers instead."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt.render(pose_seq[:1], subject_image, steps=10, progress=True)  # PNDM: 11 calls
    assert not [w for w in caught if "clamping frac" in str(w.message)]
