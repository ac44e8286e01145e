"""RTSP for real: a stream that drops and comes back, and a URL that never connects.

FFmpeg (the `ffmpeg` command, Debian package `ffmpeg`) encodes a test pattern to
H.264 and sends it as RTP to a local UDP port; `RtspRelay` below is a minimal RTSP
server (OPTIONS, DESCRIBE, SETUP with TCP-interleaved transport, PLAY, TEARDOWN)
that relays those RTP packets to the client. FFmpeg alone cannot serve RTSP to a
player (its ``-rtsp_flags listen`` works only for receiving), hence the relay. The
client under test is the agent's real `LiveSource` through OpenCV's FFmpeg backend.
Stopping the relay closes the client's connection mid-stream, as a camera that
reboots would; starting it again on the same port must bring frames back.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from flowfleet.agent.sources import LiveSource, SourceError, open_source


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtspRelay:
    """Serves one RTP/UDP feed (with its SDP) to RTSP clients over TCP interleaving."""

    def __init__(self, port: int, udp: socket.socket, sdp: str) -> None:
        self.port = port
        self.udp = udp
        self.sdp = sdp
        self.clients: list[socket.socket] = []
        self.playing: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.running = False

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(4)
        self.listener, self.running = sock, True
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        """Drop everything: the listener and every client connection."""
        self.running = False
        if self.listener is not None:
            # Wakes the thread blocked in accept(), so the port is free again.
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
        with self.lock:
            for c in self.clients:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self.clients.clear()
            self.playing.clear()

    def pump(self, stop: threading.Event) -> None:
        """Forward RTP packets from FFmpeg to every playing client (channel 0)."""
        self.udp.settimeout(0.2)
        while not stop.is_set():
            try:
                packet = self.udp.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            frame = b"$\x00" + len(packet).to_bytes(2, "big") + packet
            with self.lock:
                for c in list(self.playing):
                    try:
                        c.sendall(frame)
                    except OSError:
                        self.playing.remove(c)

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.clients.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while self.running:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    if head.startswith(b"$"):
                        continue  # RTCP from the client: ignored
                    self._answer(conn, head.decode(errors="replace"))
        except OSError:
            return

    def _answer(self, conn: socket.socket, head: str) -> None:
        lines = head.split("\r\n")
        method, url = lines[0].split(" ")[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        reply = [f"CSeq: {headers.get('cseq', '0')}"]
        body = ""
        if method == "OPTIONS":
            reply.append("Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN, GET_PARAMETER")
        elif method == "DESCRIBE":
            body = self.sdp
            reply += [f"Content-Base: {url}/", "Content-Type: application/sdp"]
        elif method == "SETUP":
            if "TCP" not in headers.get("transport", ""):
                conn.sendall(f"RTSP/1.0 461 Unsupported Transport\r\n{reply[0]}\r\n\r\n".encode())
                return
            reply += ["Transport: RTP/AVP/TCP;unicast;interleaved=0-1", "Session: 4242"]
        elif method == "PLAY":
            reply.append("Session: 4242")
            with self.lock:
                self.playing.append(conn)
        elif method == "TEARDOWN":
            with self.lock:
                if conn in self.playing:
                    self.playing.remove(conn)
        if body:
            reply.append(f"Content-Length: {len(body)}")
        conn.sendall(("RTSP/1.0 200 OK\r\n" + "\r\n".join(reply) + "\r\n\r\n" + body).encode())


@pytest.fixture
def rtsp_feed(tmp_path: Path):
    """FFmpeg test pattern -> RTP/UDP; yields (udp socket, sdp text)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.fail("ffmpeg not found: install Debian's ffmpeg package (scripts/bootstrap does)")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sdp_file = tmp_path / "feed.sdp"
    proc = subprocess.Popen(
        [
            ffmpeg, "-hide_banner", "-loglevel", "error", "-re",
            "-f", "lavfi", "-i", "testsrc=size=320x240:rate=10",
            "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
            "-g", "5", "-bf", "0", "-pix_fmt", "yuv420p",
            "-f", "rtp", "-sdp_file", str(sdp_file),
            f"rtp://127.0.0.1:{udp.getsockname()[1]}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not (sdp_file.exists() and "a=rtpmap" in sdp_file.read_text()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ffmpeg did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        yield udp, _rtsp_sdp(sdp_file.read_text())
    finally:
        proc.kill()
        proc.wait(5)
        udp.close()


def _rtsp_sdp(sdp: str) -> str:
    """FFmpeg's RTP SDP made into an RTSP DESCRIBE answer (port 0, a control URL)."""
    out = []
    for line in sdp.splitlines():
        if not line.strip():
            continue
        if line.startswith("m=video"):
            parts = line.split(" ")
            parts[1] = "0"
            line = " ".join(parts)
        out.append(line)
        if line.startswith("m=video"):
            out.append("a=control:trackID=0")
    return "\r\n".join(out) + "\r\n"


def take(source, n: int, timeout: float) -> list:
    frames, deadline = [], time.monotonic() + timeout
    for frame in source:
        frames.append(frame)
        if len(frames) >= n or time.monotonic() > deadline:
            break
    return frames


def test_rtsp_stream_drops_and_reconnects(rtsp_feed):
    udp, sdp = rtsp_feed
    port = free_port()
    relay = RtspRelay(port, udp, sdp)
    relay.start()
    stop_pump = threading.Event()
    pump = threading.Thread(target=relay.pump, args=(stop_pump,), daemon=True)
    pump.start()
    url = f"rtsp://viewer:s3cret@127.0.0.1:{port}/cam"
    source = open_source(url, backoff_s=0.2, backoff_max_s=1.0, read_timeout_s=3)
    assert isinstance(source, LiveSource) and "s3cret" not in source.name
    try:
        assert source.wait_connected(20), source.error
        assert source.fps == pytest.approx(10, abs=1)
        it = iter(source)
        next(it)
        time.sleep(1.0)  # past the burst FFmpeg buffers while probing the stream
        first = [next(it) for _ in range(5)]
        assert (first[0].image.shape[1], first[0].image.shape[0]) == (320, 240)
        # Timestamps come from the stream clock mapped to wall time: ~0.1 s apart
        # over the run, and close to now.
        span = first[-1].ts - first[0].ts
        steps = first[-1].index - first[0].index
        assert span == pytest.approx(steps / 10, abs=0.15)
        assert abs(first[-1].ts - time.time()) < 2.0

        relay.stop()  # the camera goes away mid-stream
        deadline = time.monotonic() + 15
        while source.state == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert source.state == "reconnecting", source.state
        assert f"127.0.0.1:{port}" in source.error and "s3cret" not in source.error

        relay.start()  # and comes back on the same address
        after = [next(it) for _ in range(5)]
        assert source.connects == 2
        assert after[0].index > first[-1].index  # indices run on across reconnects
        assert after[0].ts > first[-1].ts
        assert source.state == "running" and source.error is None
    finally:
        source.stop()
        relay.stop()
        stop_pump.set()
        pump.join(5)


def test_rtsp_url_that_never_connects_keeps_retrying():
    port = free_port()  # nothing listens there
    source = open_source(f"rtsp://127.0.0.1:{port}/nothing", backoff_s=0.1, backoff_max_s=0.2)
    try:
        assert not source.wait_connected(1.5)
        assert source.state == "connecting"
        assert source.failed_attempts >= 2
        assert f"rtsp://127.0.0.1:{port}/nothing" in source.error
        assert "retrying" in source.error
    finally:
        source.stop()
    source._thread.join(5)
    assert source.state == "stopped" and not source._thread.is_alive()


def test_unreachable_stream_without_reconnect_ends_iteration():
    port = free_port()
    source = open_source(f"rtsp://127.0.0.1:{port}/x", reconnect=False, open_timeout_s=2)
    assert take(source, 1, 5) == []
    assert "cannot open" in source.error


def test_gstreamer_pipeline_needs_gstreamer_build(monkeypatch):
    from flowfleet.agent import sources

    monkeypatch.setattr(sources, "_GST", False)
    with pytest.raises(SourceError, match="GStreamer"):
        open_source("libcamerasrc ! videoconvert ! appsink")
