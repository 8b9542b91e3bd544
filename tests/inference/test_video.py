"""Video in, video out (issue 17): `fasterrcnn predict` on video files, `Detector.stream`, the frame
reader and writer. The tests make their own short clips of the synthetic shapes moving (fasterrcnn
synth-video), check the per-frame json against the detector run on the same frames as images, and read
the annotated video back; a damaged and a cut-off file keep the frames before the damage."""

import json
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

from fasterrcnn import Detector
from fasterrcnn.cli import main
from fasterrcnn.data import video_source
from fasterrcnn.data.synth_video import clip_frames, write_video
from fasterrcnn.data.video_source import FrameReader, VideoError, is_live_source, source_name
from fasterrcnn.data.video_writer import VideoWriter
from fasterrcnn.inference import predict_video as predict_video_module
from fasterrcnn.inference.predict_video import predict_video

av = pytest.importorskip("av")

SIZE = (96, 128)  # H, W: quick on two cores
FRAMES = 24
FPS = 24


def decode(path) -> list[np.ndarray]:
    """Every frame of a video as [H, W, 3] uint8 RGB, read with PyAV directly (not our reader)."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def video_info(path) -> tuple[int, int, Fraction, str]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.width, stream.height, stream.average_rate, stream.codec_context.name


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "shapes.mp4"
    assert write_video(path, num_frames=FRAMES, image_size=SIZE, fps=FPS, seed=1) == FRAMES
    return path


@pytest.fixture(scope="module")
def detector(tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    return Detector.load(ckpt, device="cpu", score_threshold=0.0)


def write_mkv(path, frames: list[np.ndarray], fps: int = FPS) -> None:
    """Matroska: a cut-off copy still opens (its header is at the front), unlike an mp4 whose index is at the end."""
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def assert_records_match(records: list[dict], frames: list[np.ndarray], found) -> None:
    """The json's records equal the detector's own output on the same frames (to the json's rounding)."""
    assert len(records) == len(found) == len(frames)
    for record, dets in zip(records, found):
        assert record["labels"] == dets.labels.tolist()
        assert record["names"] == dets.names
        np.testing.assert_allclose(np.array(record["boxes"]).reshape(-1, 4), dets.boxes.numpy(), atol=0.006)
        np.testing.assert_allclose(record["scores"], dets.scores.numpy(), atol=6e-6)


# ---- the command line ------------------------------------------------------------------------------------


def test_predict_on_a_video_matches_the_detector_on_its_frames(tiny_checkpoint, detector, clip, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "pred"
    rc = main(
        ["predict", str(clip), "--weights", str(ckpt), "--out", str(out), "--score-threshold", "0"]
        + ["--batch-size", "3"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert f"in {FRAMES} frames" in text and "frames/s" in text and str(out / "videos" / "shapes.json") in text
    result = json.loads((out / "videos" / "shapes.json").read_text())
    assert (result["width"], result["height"], result["fps"], result["stride"]) == (SIZE[1], SIZE[0], FPS, 1)
    assert [c["name"] for c in result["categories"]] == ["circle", "square", "triangle", "star"]
    assert result["frames_processed"] == result["frames_decoded"] == FRAMES
    assert (result["end"], result["error"], result["partial"], result["frames_dropped"]) == ("finished", None, False, 0)
    records = result["frames"]
    assert [r["frame"] for r in records] == list(range(FRAMES))
    np.testing.assert_allclose([r["time"] for r in records], np.arange(FRAMES) / FPS, atol=1e-3)
    assert sum(len(r["scores"]) for r in records) > 0
    frames = decode(clip)  # the same frames, decoded without our reader, run as images in the same batches
    assert_records_match(records, frames, detector(frames, batch_size=3))
    # the annotated video: same size and rate, H.264, one frame per processed frame, drawn on
    annotated = out / "videos" / "shapes.mp4"
    assert video_info(annotated) == (SIZE[1], SIZE[0], FPS, "h264")
    drawn = decode(annotated)
    assert len(drawn) == FRAMES
    assert np.abs(drawn[0].astype(int) - frames[0].astype(int)).mean() > 1.0  # boxes drawn, not a copy


def test_stride_and_max_frames(tiny_checkpoint, clip, tmp_path):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "pred"
    rc = main(
        ["predict", str(clip), "--weights", str(ckpt), "--out", str(out), "--score-threshold", "0"]
        + ["--stride", "4", "--max-frames", "3"]
    )
    assert rc == 0
    result = json.loads((out / "videos" / "shapes.json").read_text())
    assert [r["frame"] for r in result["frames"]] == [0, 4, 8]
    assert result["end"] == "max_frames" and result["stride"] == 4
    width, height, rate, _ = video_info(out / "videos" / "shapes.mp4")
    assert rate == Fraction(FPS, 4) and len(decode(out / "videos" / "shapes.mp4")) == 3  # the source's duration


def test_no_video_writes_the_json_only(tiny_checkpoint, clip, tmp_path):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "pred"
    assert main(["predict", str(clip), "--weights", str(ckpt), "--out", str(out), "--no-video"]) == 0
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["shapes.json"]


def test_a_folder_of_images_and_videos(tiny_checkpoint, clip, tmp_path, capsys):
    from PIL import Image

    ckpt, _ = tiny_checkpoint
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(clip.read_bytes())
    frames = decode(clip)
    write_mkv(folder / "a.mkv", frames[:5])  # the same stem: outputs keep the suffix
    Image.fromarray(frames[0]).save(folder / "still.png")
    out = tmp_path / "pred"
    assert main(["predict", str(folder), "--weights", str(ckpt), "--out", str(out), "--max-frames", "5"]) == 0
    assert json.loads((out / "images.json").read_text())["images"][0]["file_name"] == "still.png"
    names = sorted(p.name for p in (out / "videos").iterdir())
    assert names == ["a.mkv.json", "a.mkv.mp4", "a.mp4.json", "a.mp4.mp4"]


def test_a_cut_off_and_a_broken_video_keep_their_good_frames(tiny_checkpoint, detector, clip, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    frames = decode(clip)
    folder = tmp_path / "bad"
    folder.mkdir()
    whole = folder / "whole.mkv"
    write_mkv(whole, frames)
    data = whole.read_bytes()
    (folder / "cut.mkv").write_bytes(data[: len(data) // 2])  # a download stopped half-way
    whole.unlink()
    (folder / "notavideo.mp4").write_text("hello")  # not a video at all
    out = tmp_path / "pred"
    rc = main(["predict", str(folder), "--weights", str(ckpt), "--out", str(out), "--score-threshold", "0"])
    assert rc == 1  # something failed
    err = capsys.readouterr().err
    assert "2 video(s) could not be read whole" in err
    assert f"{folder / 'cut.mkv'}: the video ends early" in err
    assert f"{folder / 'notavideo.mp4'}: cannot open this video" in err
    result = json.loads((out / "videos" / "cut.json").read_text())
    kept = result["frames_processed"]
    assert 0 < kept < FRAMES and result["end"] == "error" and "ends early" in result["error"]
    assert result["partial"] is False  # what was readable was all processed
    assert [r["frame"] for r in result["frames"]] == list(range(kept))
    assert_records_match(result["frames"], frames[:kept], detector(decode(folder / "cut.mkv")[:kept]))
    assert len(decode(out / "videos" / "cut.mp4")) == kept
    assert not (out / "videos" / "notavideo.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cameras are /dev/videoN on Linux")
def test_a_camera_that_cannot_be_opened_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    index = next(str(i) for i in range(40, 64) if not __import__("os").path.exists(f"/dev/video{i}"))
    rc = main(["predict", "--source", index, "--weights", str(ckpt), "--out", str(tmp_path / "p")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"camera {index} (/dev/video{index}): cannot open this camera" in err and "connected" in err


def test_an_unreachable_stream_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    url = "rtsp://127.0.0.1:9/none"  # the discard port: nothing listens
    assert main(["predict", url, "--weights", str(ckpt), "--out", str(tmp_path / "p")]) == 2
    assert f"{url}: cannot open this stream" in capsys.readouterr().err


def test_show_without_a_display_warns_and_writes(tiny_checkpoint, clip, tmp_path, monkeypatch, caplog):
    ckpt, _ = tiny_checkpoint
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    out = tmp_path / "pred"
    assert main(["predict", str(clip), "--weights", str(ckpt), "--out", str(out), "--show", "--max-frames", "2"]) == 0
    assert "--show: no display here" in caplog.text
    assert len(decode(out / "videos" / "shapes.mp4")) == 2


def test_no_source_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    assert main(["predict", "--weights", str(ckpt), "--out", str(tmp_path / "p")]) == 2
    assert "give at least one SOURCE" in capsys.readouterr().err


# ---- stopping part-way ------------------------------------------------------------------------------------


def _interrupt_after(monkeypatch, detector, calls: int):
    real = detector._detect_usable
    count = {"n": 0}

    def detect(images):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return real(images)

    monkeypatch.setattr(detector, "_detect_usable", detect)


def test_ctrl_c_on_a_file_keeps_the_frames_so_far_marked_partial(detector, clip, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, detector, 2)
    with pytest.raises(KeyboardInterrupt):
        predict_video(detector, clip, tmp_path, batch_size=2, show_progress=False)
    result = json.loads((tmp_path / "shapes.json").read_text())
    assert [r["frame"] for r in result["frames"]] == [0, 1, 2, 3]
    assert (result["end"], result["partial"]) == ("interrupted", True)
    assert len(decode(tmp_path / "shapes.mp4")) == 4  # the annotated video so far, playable


def test_ctrl_c_is_how_a_live_source_ends(detector, clip, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, detector, 3)
    monkeypatch.setattr(video_source, "is_live_source", lambda source: True)
    summary = predict_video(detector, clip, tmp_path, show_progress=False)
    assert (summary.end, summary.frames) == ("interrupted", 3)
    result = json.loads((tmp_path / "shapes.json").read_text())
    assert (result["end"], result["partial"], len(result["frames"])) == ("interrupted", False, 3)


# ---- the Python API ---------------------------------------------------------------------------------------


def test_detector_stream_yields_each_frame_with_its_detections(detector, clip):
    frames = decode(clip)
    got = list(detector.stream(clip, stride=5))
    assert [i for i, _, _ in got] == [0, 5, 10, 15, 20]
    for index, frame, found in got:
        assert frame.dtype == np.uint8 and frame.shape == (*SIZE, 3)
        np.testing.assert_array_equal(frame, frames[index])
        same = detector(frame)
        assert torch.equal(found.boxes, same.boxes) and torch.equal(found.scores, same.scores)


def test_detector_stream_on_a_cut_off_file_yields_then_raises(detector, clip, tmp_path):
    frames = decode(clip)
    write_mkv(tmp_path / "whole.mkv", frames)
    data = (tmp_path / "whole.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(VideoError, match="cut.mkv: the video ends early"):
        for index, _, _ in detector.stream(tmp_path / "cut.mkv"):
            got.append(index)
    assert 0 < len(got) < FRAMES and got == list(range(len(got)))


def test_detector_stream_refuses_bad_arguments(detector, clip, tmp_path):
    with pytest.raises(ValueError, match="stride"):
        next(detector.stream(clip, stride=0))
    with pytest.raises(ValueError, match="batch_size"):
        next(detector.stream(clip, batch_size=0))
    with pytest.raises(VideoError, match="no such video file"):
        next(detector.stream(tmp_path / "missing.mp4"))


# ---- reader and writer ------------------------------------------------------------------------------------


def test_reader_states_the_clip_and_counts_its_frames(clip):
    reader = FrameReader(clip, stride=2)
    assert (reader.width, reader.height, reader.fps, reader.total, reader.live) == (SIZE[1], SIZE[0], FPS, 12, False)
    frames = list(reader)
    assert [f.index for f in frames] == list(range(0, FRAMES, 2))
    assert (reader.decoded, reader.kept, reader.error) == (FRAMES, 12, None)
    np.testing.assert_allclose([f.time for f in frames], np.arange(0, FRAMES, 2) / FPS, atol=1e-3)


def test_a_live_source_drops_the_oldest_frames_instead_of_falling_behind(clip):
    reader = FrameReader(clip, live=True, queue_size=2)
    seen = []
    for frame in reader:
        seen.append(frame.index)
        time.sleep(0.03)  # a model slower than the source
    assert reader.dropped > 0 and len(seen) + reader.dropped == reader.decoded == FRAMES
    assert seen == sorted(seen) and seen[-1] == FRAMES - 1  # in order, and the newest frame is never lost


def test_abandoning_a_reader_stops_its_thread(clip):
    reader = FrameReader(clip, queue_size=1)
    frames = iter(reader)
    next(frames)
    frames.close()  # the consumer breaks out of its loop
    assert reader._thread is not None and not reader._thread.is_alive()


def test_writer_keeps_odd_sizes(tmp_path):
    images = [np.full((45, 63, 3), 40 * i, np.uint8) for i in range(5)]
    with VideoWriter(tmp_path / "odd.mp4", width=63, height=45, fps=10) as writer:
        for image in images:
            writer.write(image)
    assert video_info(tmp_path / "odd.mp4")[:3] == (63, 45, 10)
    back = decode(tmp_path / "odd.mp4")
    assert len(back) == 5 and np.abs(back[3].astype(int) - 120).mean() < 3


def test_writer_refuses_a_frame_of_another_size_and_leaves_no_file_on_error(tmp_path):
    with (
        pytest.raises(ValueError, match=r"frames must be \[48, 64, 3\] uint8"),
        VideoWriter(tmp_path / "v.mp4", width=64, height=48, fps=10) as writer,
    ):
        writer.write(np.zeros((48, 64, 3), np.uint8))
        writer.write(np.zeros((40, 64, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_source_names_and_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_live_source("0") and source_name("0") == "camera0"
    (tmp_path / "0").write_bytes(b"")  # a file named 0 is a file
    assert not is_live_source("0")
    assert is_live_source("rtsp://user:pw@cam.local:554/live/ch1?x=1")
    assert source_name("rtsp://user:pw@cam.local:554/live/ch1?x=1") == "cam.local_554_live_ch1"  # no credentials
    assert not is_live_source("clip.mp4") and source_name("dir/clip.mp4") == "clip"


# ---- the synthetic clip ------------------------------------------------------------------------------------


def test_synthetic_clip_is_seeded_and_moves(tmp_path, capsys):
    a = list(clip_frames(num_frames=6, image_size=(64, 80), seed=3))
    b = list(clip_frames(num_frames=6, image_size=(64, 80), seed=3))
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b)) and a[0][1] == b[0][1]
    assert a[0][1] != a[5][1]  # the shapes have moved
    for _, boxes in a:
        for label, (x1, y1, x2, y2) in boxes:
            assert 1 <= label <= 4 and 0 <= x1 < x2 <= 80 and 0 <= y1 < y2 <= 64
    assert main(["synth-video", "--out", str(tmp_path / "s.mp4"), "--frames", "7", "--size", "48x64"]) == 0
    assert video_info(tmp_path / "s.mp4")[:3] == (64, 48, 30) and len(decode(tmp_path / "s.mp4")) == 7


def test_the_module_names_its_outputs():
    json_path, video_path = predict_video_module.video_outputs(__import__("pathlib").Path("o"), "clip")
    assert (json_path.name, video_path.name) == ("clip.json", "clip.mp4")


def test_a_video_with_a_display_rotation_stands_upright(tmp_path):
    """A phone's portrait clip: stored 64x48 with a display rotation, read 48 wide and 64 high, turned as stated."""
    source = np.zeros((48, 64, 3), np.uint8)
    source[:12, :24] = 255  # a white patch at the top left of the stored picture
    with av.open(str(tmp_path / "phone.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise, as FFmpeg states it
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(source, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    reader = FrameReader(tmp_path / "phone.mp4")
    assert (reader.width, reader.height, reader.rotation) == (48, 64, 1)
    frames = [f.image for f in reader]
    assert len(frames) == 3 and frames[0].shape == (64, 48, 3) and frames[0].flags["C_CONTIGUOUS"]
    assert np.abs(frames[0].astype(int) - np.rot90(source).astype(int)).mean() < 4


def test_a_file_that_opens_but_holds_no_decodable_frame_is_refused_at_once(tmp_path):
    write_mkv(tmp_path / "whole.mkv", [np.full((48, 64, 3), 9 * i, np.uint8) for i in range(5)])
    (tmp_path / "stub.mkv").write_bytes((tmp_path / "whole.mkv").read_bytes()[:600])  # the header, part of a frame
    with pytest.raises(VideoError, match="stub.mkv: the video holds no frame that can be decoded"):
        FrameReader(tmp_path / "stub.mkv")


def test_without_pyav_the_error_says_what_to_install(tiny_checkpoint, clip, tmp_path, monkeypatch, capsys):
    ckpt, _ = tiny_checkpoint
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    assert main(["predict", str(clip), "--weights", str(ckpt), "--out", str(tmp_path / "p")]) == 2
    assert "video needs PyAV (FFmpeg in a wheel): pip install 'fasterrcnn[video]'" in capsys.readouterr().err
    with pytest.raises(VideoError, match=r"pip install 'fasterrcnn\[video\]'"):
        FrameReader(clip)
