"""Subject images in, frames out: the pixel convention and the video writers."""

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from dreampose.images import load_image, to_uint8
from dreampose.outputs import MARKER, read_marker
from dreampose.utils import DreamPoseError
from dreampose.video import read_png, write_frames


def test_every_image_form_gives_the_same_tensor(tmp_path, subject_image):
    path = tmp_path / "s.png"
    Image.fromarray(subject_image).save(path)
    ref = load_image(path)
    assert ref.shape == (1, 3, 64, 48) and ref.min() >= -1 and ref.max() <= 1
    rgba = Image.fromarray(subject_image).convert("RGBA")
    for other in (Image.open(path), rgba, subject_image, subject_image.astype(np.float32) / 255,
                  torch.from_numpy(subject_image).permute(2, 0, 1).float() / 255):
        assert torch.allclose(load_image(other), ref, atol=1e-6)
    assert load_image(path, (32, 24)).shape == (1, 3, 32, 24)


def test_bad_images(tmp_path):
    with pytest.raises(DreamPoseError, match="image not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DreamPoseError, match="bad.png: cannot read"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(DreamPoseError, match=r"\(H, W, 3\)"):
        load_image(np.zeros((4, 4)))
    with pytest.raises(DreamPoseError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 3.0, np.float32))


def test_to_uint8_is_linear_and_clamped_without_rescaling():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6).repeat(1, 3, 1, 1)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]
    dim = torch.full((1, 3, 2, 2), -0.5)  # a dark frame stays dark: no per-frame min-max stretching
    assert np.all(to_uint8(dim) == 64)


@pytest.fixture
def frames(rng):
    return rng.integers(0, 256, (5, 64, 48, 3), dtype=np.uint8)


def test_png_folder_is_exact(tmp_path, frames):
    out = write_frames(frames, tmp_path / "pngs")
    assert read_marker(out)["command"] == "write_frames"
    files = sorted(f for f in out.iterdir() if f.name != MARKER)
    assert [f.name for f in files] == [f"frame_{i:05d}.png" for i in range(5)]
    assert all(np.array_equal(read_png(f), fr) for f, fr in zip(files, frames))


def test_mp4_is_h264_and_playable(tmp_path, frames):
    out = write_frames(frames, tmp_path / "v.mp4", fps=12)
    reader = imageio.get_reader(str(out), format="FFMPEG")
    meta = reader.get_meta_data()
    back = [f for f in reader]
    reader.close()
    assert len(back) == 5 and back[0].shape == (64, 48, 3)
    assert meta["codec"] == "h264" and meta["fps"] == 12
    smooth = np.repeat(np.linspace(0, 255, 48, dtype=np.uint8)[None, None, :, None], 64, 1).repeat(3, 3)
    out = write_frames(np.repeat(smooth, 3, 0), tmp_path / "s.mp4")
    reader = imageio.get_reader(str(out), format="FFMPEG")
    assert np.abs(reader.get_data(0).astype(int) - smooth[0]).mean() < 3  # lossy, but faithful
    reader.close()


def test_odd_sizes_and_gif(tmp_path, rng):
    odd = rng.integers(0, 256, (3, 33, 17, 3), dtype=np.uint8)
    write_frames(odd, tmp_path / "odd.mp4")
    gif = write_frames(odd, tmp_path / "a.gif", fps=5)
    with Image.open(gif) as im:
        assert im.n_frames == 3 and im.size == (17, 33)


def test_writer_errors_leave_nothing_behind(tmp_path, frames, monkeypatch):
    with pytest.raises(DreamPoseError, match="unsupported output"):
        write_frames(frames, tmp_path / "v.avi")
    with pytest.raises(DreamPoseError, match="uint8"):
        write_frames(frames.astype(np.float32), tmp_path / "v.mp4")
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Image, "fromarray", boom)
    with pytest.raises(RuntimeError):
        write_frames(frames, tmp_path / "a.gif")
    with pytest.raises(RuntimeError):
        write_frames(frames, tmp_path / "pngs")
    assert list(tmp_path.iterdir()) == []
