"""The dreampose-rt command line: animate, import-release, and its error contract (one line, exit 2)."""

import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from dreampose.outputs import MARKER
from dreampose_rt.cli import main, parse_frames


@pytest.fixture
def inputs(tmp_path, subject_image, pose_seq):
    Image.fromarray(subject_image).save(tmp_path / "subject.png")
    np.save(tmp_path / "poses.npy", pose_seq[:3])
    return tmp_path / "subject.png", tmp_path / "poses.npy"


def _err_lines(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if line.startswith("dreampose-rt: error")], err


def test_animate_with_a_model_folder_to_gif_and_pngs(tmp_path, inputs, tiny_model_dir):
    image, poses = inputs
    args = ["animate", "--image", str(image), "--poses", str(poses), "--model", str(tiny_model_dir),
            "--steps", "2", "--quiet", "--noise", "per-frame"]  # distinct frames: GIF merges identical ones
    assert main(args + ["--out", str(tmp_path / "o.gif")]) == 0
    with Image.open(tmp_path / "o.gif") as im:
        assert im.n_frames == 3 and im.size == (48, 64)
    assert main(args + ["--out", str(tmp_path / "pngs"), "--frames", "1:3"]) == 0
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [MARKER, "frame_00000.png", "frame_00001.png"]


def test_animate_demo_writes_a_video(tmp_path):
    out = tmp_path / "demo.mp4"
    assert main(["animate", "--out", str(out), "--steps", "2", "--frames", "0:2", "--quiet"]) == 0
    reader = imageio.get_reader(str(out), format="FFMPEG")
    assert len([f for f in reader]) == 2
    reader.close()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "{tmp}/missing.png", "--poses", "{poses}"], "missing.png: image not found"),
        (["--image", "{image}"], "--image and --poses go together"),
        (["--image", "{image}", "--poses", "{tmp}/none"], "none: poses not found"),
        (["--image", "{image}", "--poses", "{poses}", "--frames", "2:9"], "out of range for 3 poses"),
        (["--image", "{image}", "--poses", "{poses}", "--out", "{tmp}/x.avi"], "unsupported output type"),
        (["--image", "{image}", "--poses", "{poses}", "--model", "{tmp}"], "not a DreamPose model folder"),
        (["--image", "{image}", "--poses", "{poses}", "--steps", "0"], "steps must be between 1 and 1000"),
    ],
)
def test_errors_are_one_line_and_exit_2(tmp_path, inputs, capsys, extra, message):
    image, poses = inputs
    fill = dict(tmp=tmp_path, image=image, poses=poses)
    args = ["animate", "--out", str(tmp_path / "o.mp4")] + [a.format(**fill) for a in extra]
    assert main(args) == 2
    errors, err = _err_lines(capsys)
    assert len(errors) == 1 and message in errors[0], err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "o.mp4").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="image not found"):
        main(["animate", "--debug", "--image", str(tmp_path / "no.png"), "--poses", str(tmp_path)])


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dreampose_rt.cli", "animate", "--image", str(tmp_path / "no.png"), "--poses", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("dreampose-rt: error:")
    assert "Traceback" not in proc.stderr


def test_parse_frames():
    assert parse_frames("2:5", 10) == [2, 3, 4]
    assert parse_frames(":2", 10) == [0, 1]
    assert parse_frames("8:", 10) == [8, 9]
    assert parse_frames("3", 10) == [3]
    for bad in ("5:2", "a:b", "0:11", "-1:2"):
        with pytest.raises(ValueError):
            parse_frames(bad, 10)


def test_import_release_cli(tmp_path):
    """import-release: the release's .pth files + local SD and CLIP folders -> a loadable model folder."""
    import json

    from diffusers import UNet2DConditionModel

    from dreampose.model import DreamPoseModel, bundled_config

    trained = DreamPoseModel.tiny(seed=4)
    sd = tmp_path / "sd"
    # an SD folder whose UNet has 4 input channels, like the real one
    UNet2DConditionModel.from_config({**dict(trained.unet.config), "in_channels": 4}).save_pretrained(sd / "unet")
    trained.vae.save_pretrained(sd / "vae")
    (sd / "scheduler").mkdir()
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(bundled_config("scheduler_config")))
    trained.image_encoder.save_pretrained(tmp_path / "clip")
    torch.save({"module." + k: v for k, v in trained.unet.state_dict().items()}, tmp_path / "unet.pth")
    torch.save(trained.adapter.state_dict(), tmp_path / "adapter.pth")
    code = main(["import-release", "--unet", str(tmp_path / "unet.pth"), "--adapter", str(tmp_path / "adapter.pth"),
                 "--sd", str(sd), "--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "model"),
                 "--height", "64", "--width", "48", "--quiet"])
    assert code == 0
    loaded = DreamPoseModel.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.unet.conv_in.weight, trained.unet.conv_in.weight)
    assert main(["import-release", "--unet", str(tmp_path / "adapter.pth"), "--adapter", str(tmp_path / "adapter.pth"),
                 "--sd", str(sd), "--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "m2"),
                 "--height", "64", "--width", "48", "--quiet"]) == 2
    assert not (tmp_path / "m2").exists()


def test_quality_presets_and_fast_mode(tmp_path, inputs, tiny_model_dir, monkeypatch):
    import dreampose_rt.animate as animate

    seen = []

    def capture(rt, out, poses, image, settings, **kw):
        seen.append(settings)
        raise KeyboardInterrupt  # stop before rendering: only the settings matter here

    monkeypatch.setattr(animate, "render_to_file", capture)
    image, poses = inputs
    base = ["animate", "--image", str(image), "--poses", str(poses), "--model", str(tiny_model_dir),
            "--out", str(tmp_path / "o.mp4"), "--quiet"]
    from dreampose.settings import QUALITY_PRESETS

    assert main(base + ["--fast"]) == 130
    assert main(base + ["--fast", "--steps", "20"]) == 130
    assert main(base + ["--quality", "balanced"]) == 130
    assert main(base) == 130
    fast, balanced = QUALITY_PRESETS["fast"], QUALITY_PRESETS["balanced"]
    assert [(s.quality, s.scheduler, s.steps) for s in seen] == [
        ("fast", "dpmpp", fast["steps"]), ("custom", "dpmpp", 20), ("balanced", "pndm", 100), ("exact", "pndm", 100)]
    assert seen[0].guidance_cache == fast["guidance_cache"] and seen[2].feature_cache == balanced["feature_cache"]
