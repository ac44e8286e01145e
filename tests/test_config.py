"""Agent config loading and --line/--zone parsing: errors name the key and the file."""

from __future__ import annotations

import pytest

from flowfleet.agent.config import ConfigError, load_agent_config, parse_line, parse_zone
from flowfleet.agent.tracker import TrackerConfig

GOOD = """
device_id = "cam-1"
state_dir = "state"

[[cameras]]
name = "door"
source = "video.mp4"
model = "model.tflite"

[[cameras.lines]]
name = "entry"
points = [[0, 10], [100, 10]]
"""


def write(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_good_config_resolves_paths_relative_to_the_file(tmp_path):
    cfg = load_agent_config(write(tmp_path, GOOD))
    assert cfg.device_id == "cam-1"
    assert cfg.cameras[0].source == str(tmp_path / "video.mp4")
    assert cfg.state_dir == str(tmp_path / "state")
    assert cfg.cameras[0].lines[0].points == ((0, 10), (100, 10))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "\nsurprise = 1\n", "surprise: unknown key"),
        (GOOD.replace('device_id = "cam-1"', 'device_id = "cam/1"'), "device_id"),
        (GOOD.replace("[[0, 10], [100, 10]]", "[[0, 10]]"), "cameras.0.lines.0.points"),
        (GOOD.replace("[[0, 10], [100, 10]]", "[[0, 10], [0, 10]]"), "same"),
        (GOOD.replace("[[cameras.lines]]", '[[cameras.lines]]\ncolour = "red"'), "colour"),
        ("device_id = ", "not valid TOML"),
        ('device_id = "x"\ncameras = []', "cameras"),
        (GOOD + "\n[broker]\nport = 70000\n", "broker.port"),
        (
            GOOD + '\n[broker]\npassword_file = "pw"\n',
            "broker: a password needs a username",
        ),
        (
            GOOD + '\n[broker]\nusername = "u"\npassword_file = "pw"\npassword_env = "PW"\n',
            "give password_file or password_env, not both",
        ),
        (
            GOOD + '\n[broker]\nusername = "u"\npassword_file = "missing.txt"\n',
            "broker.password_file: file not found",
        ),
        (
            GOOD + '\n[broker]\nusername = "u"\npassword_env = "FLOWFLEET_TEST_UNSET_PW"\n',
            "broker.password_env: environment variable FLOWFLEET_TEST_UNSET_PW is not set",
        ),
        (GOOD + '\n[broker]\npassword_env = "1bad"\n', "broker.password_env"),
        (GOOD + '\n[broker]\ncert_file = "c.pem"\n', "cert_file and key_file go together"),
        (
            GOOD + '\n[broker]\ncert_file = "c.pem"\nkey_file = "k.pem"\n',
            "a client certificate needs ca_file",
        ),
        (GOOD + '\n[broker]\nca_file = "nope.pem"\n', "broker.ca_file: file not found"),
        (
            GOOD + "\n[broker]\nreconnect_min_s = 10\nreconnect_max_s = 5\n",
            "reconnect_max_s is below reconnect_min_s",
        ),
        (GOOD + "\n[outbox]\nmax_messages = 0\n", "outbox.max_messages"),
        (GOOD + '\n[outbox]\npolicy = "drop_newest"\n', "outbox.policy"),
        (GOOD + "\n[outbox]\nsend_rate = -1\n", "outbox.send_rate"),
        (GOOD + "\n[outbox]\nlimit = 5\n", "outbox.limit: unknown key"),
        (GOOD + "\n[metrics]\nport = 0\n", "metrics.port"),
        (GOOD + '\n[metrics]\nport = "x"\n', "metrics.port"),
        (
            GOOD + '\n[registry]\nurl = "http://registry.local:8080"\n',
            "registry: url needs keys_file",
        ),
        (GOOD + '\n[registry]\nurl = "ftp://x"\nkeys_file = "k.json"\n', "registry.url"),
        (
            GOOD + '\n[registry]\ntoken_file = "t"\ntoken_env = "T"\n',
            "give token_file or token_env, not both",
        ),
        (
            GOOD + '\n[registry]\nurl = "http://r"\nkeys_file = "missing.json"\n',
            "registry.keys_file: file not found",
        ),
        (
            GOOD + '\n[registry]\ntoken_env = "FLOWFLEET_TEST_UNSET_TOKEN"\n',
            "registry.token_env: environment variable FLOWFLEET_TEST_UNSET_TOKEN is not set",
        ),
        (GOOD + '\n[registry]\ntoken_file = "nope"\n', "registry.token_file: file not found"),
        (GOOD + "\n[registry]\ngate_max_ms = 0\n", "registry.gate_max_ms"),
        (GOOD + "\n[registry]\nmax_errors = 0\n", "registry.max_errors"),
        (GOOD + "\n[registry]\nsigned = false\n", "registry.signed: unknown key"),
        (GOOD + "\n[cameras.tracker]\nlost_s = 0\n", "cameras.0.tracker.lost_s"),
        (GOOD + "\n[cameras.tracker]\nlost = 5\n", "cameras.0.tracker.lost: unknown key"),
        (GOOD + "\n[cameras.tracker]\nmin_hits = 1.5\n", "cameras.0.tracker.min_hits"),
        (GOOD + "\n[cameras.tracker]\nmatch_iou = 0\n", "cameras.0.tracker.match_iou"),
        (
            GOOD + "\n[cameras.tracker]\nhigh_thresh = 0.3\nlow_thresh = 0.4\n",
            "cameras.0.tracker: low_thresh 0.4 is above high_thresh 0.3",
        ),
        (
            GOOD + "\n[cameras.tracker]\nnew_track_thresh = 0.5\n",
            "cameras.0.tracker: new_track_thresh 0.5 is below high_thresh 0.6",
        ),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_camera_tracker_settings(tmp_path):
    text = GOOD + "\n[cameras.tracker]\nlost_s = 5\nhigh_thresh = 0.4\nnew_track_thresh = 0.5\n"
    cfg = load_agent_config(write(tmp_path, text))
    tracker = cfg.cameras[0].tracker.config(fps=20)
    assert (tracker.lost_buffer, tracker.high_thresh, tracker.new_track_thresh) == (100, 0.4, 0.5)
    # Without the table: the tracker's defaults.
    assert load_agent_config(write(tmp_path, GOOD)).cameras[0].tracker.config(fps=20) == (
        TrackerConfig.for_fps(20)
    )


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_agent_config(tmp_path / "nope.toml")


def test_parse_line_and_zone():
    line = parse_line("door:0,10.5,100,10")
    assert line.name == "door" and line.points == ((0, 10.5), (100, 10))
    zone = parse_zone("z:0,0;10,0;10,10")
    assert zone.points == ((0, 0), (10, 0), (10, 10))


@pytest.mark.parametrize(
    ("spec", "parser", "message"),
    [
        ("door:0,10", parse_line, "2 points"),
        ("door", parse_line, "NAME:x1,y1,x2,y2"),
        ("door:a,b,c,d", parse_line, "numbers"),
        ("door:1,1,1,1", parse_line, "same"),
        ("bad/name:0,0,1,1", parse_line, "line name"),
        ("z:0,0;1,1", parse_zone, "at least 3"),
        ("z:0,0;1;2,2", parse_zone, "x,y"),
    ],
)
def test_bad_line_and_zone_specs(spec, parser, message):
    with pytest.raises(ConfigError, match=message):
        parser(spec)


SECRET = "pa55-w0rd-never-logged"


def test_password_from_file_or_environment_is_never_in_the_config(tmp_path, monkeypatch):
    from flowfleet.agent.config import read_password
    from flowfleet.mqtt import BrokerAddress

    (tmp_path / "pw").write_text(SECRET + "\n")
    cfg = load_agent_config(
        write(tmp_path, GOOD + '\n[broker]\nusername = "cam-1"\npassword_file = "pw"\n')
    )
    assert cfg.broker.password_file == str(tmp_path / "pw")
    assert read_password(cfg.broker) == SECRET
    assert SECRET not in repr(cfg) and SECRET not in cfg.model_dump_json()
    address = BrokerAddress(cfg.broker.host, cfg.broker.port, "cam-1", SECRET)
    assert SECRET not in repr(address) and SECRET not in str(address)

    monkeypatch.setenv("FLOWFLEET_TEST_PW", SECRET)
    cfg = load_agent_config(
        write(tmp_path, GOOD + '\n[broker]\nusername = "u"\npassword_env = "FLOWFLEET_TEST_PW"\n')
    )
    assert read_password(cfg.broker) == SECRET and SECRET not in repr(cfg)


def test_outbox_and_metrics_defaults(tmp_path):
    cfg = load_agent_config(write(tmp_path, GOOD))
    assert cfg.outbox.policy == "keep_counts" and cfg.outbox.max_messages == 100_000
    assert cfg.metrics.port is None
    cfg = load_agent_config(
        write(tmp_path, GOOD + '\n[metrics]\nport = 9108\n[outbox]\npolicy = "drop_oldest"\n')
    )
    assert cfg.metrics.port == 9108 and cfg.outbox.policy == "drop_oldest"


@pytest.mark.parametrize(
    "source",
    ["rtsp://user:pw@cam.local/stream1", "0", "/dev/video0", "libcamerasrc ! appsink"],
)
def test_stream_and_camera_sources_are_not_resolved_as_paths(tmp_path, source):
    cfg = load_agent_config(write(tmp_path, GOOD.replace('"video.mp4"', f'"{source}"')))
    assert cfg.cameras[0].source == source


def test_registry_section_resolves_paths_and_checks_the_key_bundle(tmp_path, monkeypatch):
    from flowfleet.agent.config import read_token

    (tmp_path / "keys.json").write_text("not json")
    text = GOOD + '\n[registry]\nurl = "http://r:8080"\nkeys_file = "keys.json"\n'
    with pytest.raises(ConfigError, match=r"registry\.keys_file: not a JSON key bundle"):
        load_agent_config(write(tmp_path, text))
    (tmp_path / "keys.json").write_text('{"keys": []}')
    with pytest.raises(ConfigError, match=r"registry\.keys_file: no keys in the bundle"):
        load_agent_config(write(tmp_path, text))
    (tmp_path / "keys.json").write_text(
        '{"keys": [{"key_id": "0123456789abcdef", "public_key": "AAAA", "not_after": null}]}'
    )
    monkeypatch.setenv("FLOWFLEET_TEST_TOKEN", SECRET)
    cfg = load_agent_config(write(tmp_path, text + 'token_env = "FLOWFLEET_TEST_TOKEN"\n'))
    assert cfg.registry.keys_file == str(tmp_path / "keys.json")
    assert cfg.registry.models_dir is None and cfg.registry.gate_latency_factor == 5.0
    assert read_token(cfg.registry) == SECRET and SECRET not in repr(cfg)
