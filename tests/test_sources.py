"""Frame sources: resume position, image folders, live newest-frame buffer, clock, factory."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from flowfleet.agent.sources import (
    ImageFolderSource,
    LiveSource,
    SourceError,
    VideoFileSource,
    _SourceClock,
    open_source,
    redact_url,
    source_kind,
)


@pytest.fixture(scope="module")
def traffic(videos):
    return videos / "traffic_frames.mp4"  # 20 frames, 30 fps


@pytest.fixture(scope="module")
def traffic_frames(traffic):
    return list(VideoFileSource(traffic))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(np.int16) - b).max()) == 0


def test_start_frame_resumes_at_that_frame(traffic, traffic_frames):
    assert len(traffic_frames) == 20
    resumed = list(VideoFileSource(traffic, start_frame=7))
    assert [f.index for f in resumed] == list(range(7, 20))
    assert resumed[0].ts == pytest.approx(7 / 30)
    assert all(same(a.image, b.image) for a, b in zip(traffic_frames[7:], resumed, strict=True))


def test_start_frame_past_the_end(traffic, traffic_frames):
    assert list(VideoFileSource(traffic, start_frame=25)) == []
    # A looping file numbers frames on across loops: 45 is frame 5 of the third pass.
    frames = []
    for f in VideoFileSource(traffic, start_frame=45, loop=True):
        frames.append(f)
        if len(frames) == 20:
            break
    assert frames[0].index == 45 and same(frames[0].image, traffic_frames[5].image)
    assert frames[15].index == 60 and same(frames[15].image, traffic_frames[0].image)


def test_start_frame_with_fps_cap_and_realtime(traffic):
    src = VideoFileSource(traffic, start_frame=10, fps_cap=10, realtime=True)
    t0 = time.time()
    frames = list(src)
    assert [f.index for f in frames] == [12, 15, 18]  # every 3rd frame of the file
    assert frames[0].ts == pytest.approx(t0 + 2 / 30, abs=0.05)  # wall clock
    assert src.delivered_fps == 10


def test_bad_start_frame(traffic):
    with pytest.raises(SourceError, match="start_frame"):
        VideoFileSource(traffic, start_frame=-1)


def write_folder(folder, frames, names):
    folder.mkdir()
    for frame, name in zip(frames, names, strict=True):
        cv2.imwrite(str(folder / name), frame.image)


def test_image_folder_natural_order_fps_and_resume(tmp_path, traffic_frames):
    names = [f"img{i}.png" for i in range(12)]  # img10 sorts after img9
    write_folder(tmp_path / "imgs", traffic_frames[:12], names)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "zz-broken.jpg").write_bytes(b"not a jpeg")
    src = ImageFolderSource(tmp_path / "imgs", fps=4)
    assert src.frame_count == 13  # 12 images + the broken one (skipped when read)
    frames = list(src)
    assert [f.index for f in frames] == list(range(12))
    assert frames[10].ts == pytest.approx(2.5)
    assert all(same(a.image, b.image) for a, b in zip(traffic_frames[:12], frames, strict=True))
    assert src.unreadable == 1
    resumed = list(open_source(str(tmp_path / "imgs"), fps=4, start_frame=9))
    assert [f.index for f in resumed] == [9, 10, 11]


def test_image_folder_errors(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        ImageFolderSource(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no image files"):
        ImageFolderSource(tmp_path / "empty")


def test_live_source_keeps_only_the_newest_frame(traffic):
    """A fast source and a slow consumer: no backlog, the gaps are counted as dropped."""
    src = LiveSource(
        "test",
        kind="camera",
        reconnect=False,
        capture_factory=lambda: cv2.VideoCapture(str(traffic)),
    )
    frames = []
    for f in src:
        frames.append(f)
        time.sleep(0.2)  # the reader decodes all 20 frames meanwhile
    indices = [f.index for f in frames]
    assert indices == sorted(indices) and len(frames) < 10
    assert indices[-1] == 19  # the newest frame is never lost
    assert src.frames_read == 20
    assert src.dropped_frames == 20 - len(frames)
    assert src.state == "stopped" and "stream ended" in src.error


def test_live_fps_cap_skips_by_source_time(traffic):
    src = LiveSource(
        "test",
        kind="camera",
        fps_cap=10,
        reconnect=False,
        capture_factory=lambda: cv2.VideoCapture(str(traffic)),
    )
    frames = list(src)  # consumer fast enough: nothing dropped
    assert src.skipped_frames + src.dropped_frames + len(frames) == 20
    assert src.skipped_frames >= 10


def test_source_clock_maps_stream_time_to_wall_clock():
    clock = _SourceClock(max_drift_s=2.0)
    # A burst: five buffered frames (0..400 ms of stream time) read at once at t=100.
    burst = [clock.stamp(i * 100.0, now=100.0) for i in range(5)]
    assert burst == sorted(burst) and max(burst) <= 100.0
    # Then real time: frame 500 ms arrives at 100.1; stamps keep the stream's spacing.
    live = [clock.stamp(500.0 + i * 100.0, now=100.1 + i * 0.1 + 0.003 * (i % 2)) for i in range(5)]
    assert np.diff(live) == pytest.approx([0.1] * 4, abs=1e-6)
    assert live[-1] <= 100.5 + 0.003
    # No source clock: the time the reader got the frame.
    assert clock.stamp(float("nan"), now=101.0) == 101.0
    # Stream timestamps restart (a new session): re-anchored, never backwards.
    assert clock.stamp(0.0, now=101.5) == 101.5
    assert clock.stamp(100.0, now=101.6) == pytest.approx(101.6)
    # The camera clock falls behind the wall clock by more than max_drift: re-anchored.
    assert clock.stamp(200.0, now=110.0) == 110.0


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("rtsp://cam.local:554/stream1", "stream"),
        ("RTSPS://cam/x", "stream"),
        ("http://cam/mjpeg", "stream"),
        ("0", "camera"),
        ("/dev/video2", "camera"),
        ("libcamerasrc ! video/x-raw,width=640 ! videoconvert ! appsink", "gstreamer"),
        ("/srv/video/door.mp4", "file"),
    ],
)
def test_source_kind(spec, kind):
    assert source_kind(spec) == kind


def test_open_source_picks_kind(tmp_path, traffic):
    assert isinstance(open_source(str(traffic)), VideoFileSource)
    (tmp_path / "f").mkdir()
    cv2.imwrite(str(tmp_path / "f" / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    assert isinstance(open_source(str(tmp_path / "f")), ImageFolderSource)
    live = open_source("/dev/video9")
    assert isinstance(live, LiveSource) and live.state == "connecting"  # not started yet
    with pytest.raises(SourceError, match=r"absent\.mp4"):
        open_source(str(tmp_path / "absent.mp4"))


def test_camera_that_does_not_exist_reports_and_retries():
    src = open_source("/dev/video97", backoff_s=0.05, backoff_max_s=0.1)
    try:
        assert not src.wait_connected(0.6)
        assert src.failed_attempts >= 2
        assert "/dev/video97" in src.error and "camera device" in src.error
    finally:
        src.stop()


def test_redact_url():
    assert redact_url("rtsp://admin:hunter2@10.0.0.5/live") == "rtsp://admin:***@10.0.0.5/live"
    assert redact_url("rtsp://10.0.0.5:554/live") == "rtsp://10.0.0.5:554/live"


def test_count_image_folder_matches_the_video(tmp_path, traffic, traffic_frames, int8_model):
    """The same frames as lossless PNGs in a folder count exactly like the video."""
    from flowfleet.agent.config import parse_line
    from flowfleet.agent.offline import count_video

    write_folder(tmp_path / "frames", traffic_frames, [f"f{i}.png" for i in range(20)])
    lines = [parse_line("gantry:480,280,480,540")]
    video = count_video(traffic, int8_model, lines=lines, progress=False)
    folder = count_video(tmp_path / "frames", int8_model, lines=lines, progress=False, fps=30)
    assert folder.frames == video.frames == 20
    assert folder.to_dict()["lines"] == video.to_dict()["lines"]
    assert video.to_dict()["lines"]["gantry"]["total"]["in"] >= 2


def test_count_refuses_live_sources(int8_model):
    from flowfleet.agent.offline import count_video

    with pytest.raises(SourceError, match="live streams"):
        count_video("rtsp://127.0.0.1:1/x", int8_model)
