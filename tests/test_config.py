"""Agent config loading and --line/--zone parsing: errors name the key and the file."""

from __future__ import annotations

import pytest

from flowfleet.agent.config import ConfigError, load_agent_config, parse_line, parse_zone

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
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


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
