"""Shadow comparisons started and stopped by the desired state, end to end.

A real registry served over HTTP (its own signing key), a real Mosquitto and an
in-process agent counting a looping clip with the real int8 model: the candidate
is downloaded and verified exactly like an update but never activated; a refused
one is an event and counting goes on.
"""

from __future__ import annotations

import time

import pytest

from flowfleet import signing
from flowfleet.agent.service import AgentService
from flowfleet.contract import Desired, ShadowRef
from tests.test_agent_update import (
    DEVICE,
    DYN,
    FULL,
    TOPICS,
    Watcher,
    make_config,
    ref_of,
    running_file,
    served_registry,
    upload,
    wait_frames,
)
from tests.test_shadow_agent import Listener


@pytest.fixture
def registry_http(tmp_path):
    """(base URL, test client, operator token, device token) of a served registry."""
    with served_registry(tmp_path) as served:
        yield served


def desire(watcher: Watcher, version: int, shadow: dict | None, models=None) -> None:
    payload = Desired(device=DEVICE, version=version, models=models or {}, shadow=shadow).to_json()
    watcher.client.publish(TOPICS.desired(DEVICE), payload, qos=1, retain=True).wait_for_publish(5)


def test_desired_shadow_is_verified_run_reported_and_stopped(
    tmp_path, broker, registry_http, videos, int8_model, data
):
    base, client, op, dev = registry_http
    dyn = upload(client, op, data / "models" / DYN, "yolo-dyn")
    full = upload(client, op, data / "models" / FULL, "yolo")
    config = make_config(tmp_path, broker, base, dev, videos, int8_model)
    config = config.model_copy(
        update={"shadow": config.shadow.model_copy(update={"window_seconds": 1.0})}
    )
    watcher = Watcher(broker)
    listener = Listener(broker, DEVICE)
    service = AgentService(config)
    cam = service.cameras["road"]
    service.start()
    try:
        wait_frames(service, 3)
        good = ref_of(full)
        refused = [
            ("unsigned", good.model_copy(update={"manifest": None, "signature": None})),
            (
                "signature",
                good.model_copy(
                    update={
                        "signature": signing.sign(
                            signing.Ed25519PrivateKey.generate(), full["manifest"].encode()
                        )
                    }
                ),
            ),
            # the url serves another artifact than the signed manifest describes
            ("checksum", good.model_copy(update={"url": dyn["download_url"]})),
        ]
        for version, (reason, ref) in enumerate(refused, start=1):
            seen = len(watcher.events)
            desire(watcher, version, {"road": ShadowRef(model=ref)})
            ev = watcher.wait_event("shadow_failed", after=seen)
            assert (ev.data["reason"], ev.camera, ev.severity) == (reason, "road", "error")
            assert cam.shadow is None and service.shadows.runners == {}
            wait_frames(service, 3)  # counting goes on
            assert running_file(service) == FULL

        # A signed candidate: downloaded, verified, run beside the active model.
        seen = len(watcher.events)
        desire(watcher, 4, {"road": ShadowRef(model=ref_of(dyn), share=0.5)})
        ev = watcher.wait_event("shadow_started", after=seen)
        assert (ev.data["model"], ev.data["version"], ev.data["share"]) == ("yolo-dyn", 1, 0.5)
        assert [e.type for e in watcher.events[seen:]] == ["shadow_started"]
        assert running_file(service) == FULL, "a shadow model is never activated"
        assert service.updater.active == {}
        deadline = time.monotonic() + 30
        while not listener.of("shadow") and time.monotonic() < deadline:
            time.sleep(0.05)
        window = listener.of("shadow")[0]
        assert window.candidate.model == "yolo-dyn" and window.candidate.sha256 == dyn["sha256"]
        assert window.active.file == FULL and window.share == 0.5
        assert 0 < window.frames_compared <= window.frames
        assert window.seq == 1
        files = {p.name for p in (tmp_path / "state" / "models").iterdir()}
        assert any(f.startswith("yolo-dyn-v1-") for f in files)

        # The same desired state again (a reconnect's retained copy): nothing restarts.
        runner = cam.shadow
        desire(watcher, 4, {"road": ShadowRef(model=ref_of(dyn), share=0.5)})
        time.sleep(0.5)
        assert cam.shadow is runner

        # A model update while the comparison runs: the window closes at the swap and
        # the next ones name the new active model.
        seen = len(watcher.events)
        shadow = {"road": ShadowRef(model=ref_of(dyn), share=0.5)}
        desire(watcher, 5, shadow, models={"road": ref_of(full)})
        watcher.wait_event("model_activated", after=seen)
        assert cam.shadow is runner, "the comparison goes on"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            w.active.model == "yolo" for w in listener.of("shadow")
        ):
            time.sleep(0.05)
        after = [w for w in listener.of("shadow") if w.active.model == "yolo"]
        assert after and after[0].active.version == 1 and after[0].active.sha256 == full["sha256"]
        before = [w for w in listener.of("shadow") if w.active.model is None]
        assert before and all(w.active.file == FULL for w in before)

        # A desired state without the shadow entry stops it; the last window is sent.
        seen, windows = len(watcher.events), len(listener.of("shadow"))
        desire(watcher, 6, None, models={"road": ref_of(full)})
        watcher.wait_event("shadow_stopped", after=seen)
        assert cam.shadow is None
        deadline = time.monotonic() + 10
        while len(listener.of("shadow")) <= windows and time.monotonic() < deadline:
            time.sleep(0.05)
        seqs = [w.seq for w in listener.of("shadow")]
        assert seqs == list(range(1, len(seqs) + 1)), "one per-device sequence"
        wait_frames(service, 3)
    finally:
        service.stop()
        watcher.close()
        listener.close()
