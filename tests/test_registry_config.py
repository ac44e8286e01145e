"""The registry's TOML config file: validated at load, errors name the file and the key,
flags override it, `flowfleet registry check-config` checks it (in-process)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowfleet.cli import build_parser, main
from flowfleet.registry.cli.common import settings
from flowfleet.registry.config import RegistrySettings, load_registry_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "registry.md"


def check(path: Path, capsys) -> tuple[int, str, str]:
    rc = main(["registry", "check-config", "--config", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[broker]\nhots = "mqtt.example"\n', "broker.hots: unknown key"),
        ("[htp]\nport = 80\n", "htp: unknown key"),
        ('[broker]\nport = "eighteen"\n', "broker.port: Input should be a valid integer"),
        ("[http]\nport = 70000\n", "http.port: Input should be less than or equal to 65535"),
        ("[http]\nthreads = 0\n", "http.threads: Input should be greater than or equal to 1"),
        ('[http]\nanonymous_read = "some"\n', "http.anonymous_read: Input should be 'local'"),
        ('[http]\ntrusted_proxies = ["a proxy"]\n', "http.trusted_proxies.0: "),
        (
            "[http]\nthreads = 4\nlive_streams = 4\n",
            "http: live_streams (4) must be below threads (4)",
        ),
        ("[http]\nlive_stream_s = 1\n", "http.live_stream_s: Input should be greater than"),
        ('[storage]\nmax_upload_mib = "big"\n', "storage.max_upload_mib: Input should be"),
        (
            '[broker]\nusername = "registry"\npassword_file = "missing.pw"\n',
            "broker.password_file: file not found: ",
        ),
        (
            '[broker]\nusername = "registry"\npassword = "hunter2-secret"\n',
            "broker.password: the password never goes in the config file",
        ),
        (
            '[broker]\nusername = "registry"\npassword_env = "FLOWFLEET_TEST_UNSET_PW"\n',
            "broker.password_env: environment variable FLOWFLEET_TEST_UNSET_PW is not set",
        ),
        (
            '[broker]\nusername = "cam-1"\n',
            "broker.username: username 'cam-1' is not one of the registry's reserved",
        ),
        (
            '[broker]\nclient_id = "cam-1"\n',
            "broker.client_id: client_id 'cam-1' is not one of the registry's reserved",
        ),
        ('[broker]\npassword_file = "pw"\n', "broker: a password needs a username"),
        (
            '[broker]\nca_file = "ca.crt"\ncert_file = "r.crt"\n',
            "broker: cert_file and key_file go together",
        ),
        ("[broker\nport = 1\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_file_and_the_key(tmp_path, capsys, monkeypatch, toml, expected):
    monkeypatch.delenv("FLOWFLEET_TEST_UNSET_PW", raising=False)
    path = tmp_path / "registry.toml"
    path.write_text(toml)
    rc, out, err = check(path, capsys)
    assert rc == 2, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert f"{path}: " in err and expected in err, err
    assert "hunter2-secret" not in err  # a password in the file is refused, never echoed


def test_good_config_relative_paths_and_check_config(tmp_path, capsys, monkeypatch):
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "registry.pw").write_text("s3cret-registry-pw\n")
    for name in ("ca.crt", "registry.crt", "registry.key"):
        (conf / name).write_text("x")
    path = conf / "registry.toml"
    path.write_text(
        """
[database]
url = "registry.sqlite"

[storage]
state_dir = "state"
max_upload_mib = 64

[broker]
host = "broker.example"
port = 8883
username = "registry"
password_file = "registry.pw"
ca_file = "ca.crt"
cert_file = "registry.crt"
key_file = "registry.key"

[http]
host = "0.0.0.0"
port = 9090
threads = 12
proxy_hops = 1
trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]

[watch]
dir = "drop"
"""
    )
    s = load_registry_config(path)
    assert s.database.url == str(conf / "registry.sqlite")
    assert s.storage.state_dir == str(conf / "state")
    assert s.broker.password_file == str(conf / "registry.pw")
    assert s.broker.ca_file == str(conf / "ca.crt")
    assert s.watch.dir == str(conf / "drop")
    assert (s.http.threads, s.http.proxy_hops, s.storage.max_upload_mib) == (12, 1, 64)
    assert "s3cret" not in repr(s)

    monkeypatch.delenv("FLOWFLEET_DATABASE_URL", raising=False)
    rc, out, err = check(path, capsys)
    assert rc == 0, err
    assert "ok" in out and "mqtts://broker.example:8883" in out and "'registry'" in out
    assert "s3cret" not in out + err


def test_urls_in_the_config_are_kept_as_they_are(tmp_path):
    """A database or artifact store URL is not a path: it is used as written (a
    PostgreSQL URL once came back as None, and the registry fell back to its default
    SQLite file without a word)."""
    path = tmp_path / "registry.toml"
    path.write_text(
        '[database]\nurl = "postgresql://flowfleet@db.example:5432/fleet"\n'
        '[storage]\nartifacts = "s3://models/fleet"\nkey_dir = "keys"\n'
    )
    s = load_registry_config(path)
    assert s.database.url == "postgresql://flowfleet@db.example:5432/fleet"
    assert s.storage.artifacts == "s3://models/fleet"
    assert s.storage.key_dir == str(tmp_path / "keys")
    path.write_text('[database]\nurl = "sqlite:///var/lib/flowfleet/registry.sqlite"\n')
    assert load_registry_config(path).database.url == "sqlite:///var/lib/flowfleet/registry.sqlite"


def test_flags_override_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWFLEET_DATABASE_URL", raising=False)
    path = tmp_path / "registry.toml"
    path.write_text(
        '[database]\nurl = "from-file.sqlite"\n'
        '[broker]\nhost = "file-host"\nport = 1884\n'
        '[http]\nport = 9000\nthreads = 4\nanonymous_read = "none"\n'
    )
    parse = build_parser().parse_args

    args = parse(["registry", "--config", str(path)])
    s = settings(args)
    assert (s.broker.host, s.broker.port, s.http.port, s.http.threads) == (
        "file-host",
        1884,
        9000,
        4,
    )
    assert s.http.anonymous_read == "none"

    flags = ["--broker-port", "1999", "--http-threads", "2", "--anonymous-read", "local"]
    args = parse(["registry", "--config", str(path), *flags, "--db", "flag.sqlite"])
    s = settings(args)
    assert (s.broker.host, s.broker.port, s.http.port, s.http.threads) == (
        "file-host",
        1999,
        9000,
        2,
    )
    assert s.http.anonymous_read == "local"
    from flowfleet.registry.cli.common import _db_url

    assert _db_url(args) == "flag.sqlite"
    assert _db_url(parse(["registry", "--config", str(path)])) == str(tmp_path / "from-file.sqlite")
    # The shared options, --config included, also follow a management action.
    args = parse(["registry", "models", "list", "--config", str(path)])
    assert _db_url(args) == str(tmp_path / "from-file.sqlite")


def test_a_bad_flag_is_named_like_a_bad_key(tmp_path, capsys):
    rc = main(["registry", "check-config", "--http-threads", "0", "--db", str(tmp_path / "x")])
    _, err = capsys.readouterr()
    assert rc == 2 and "command line: http.threads: Input should be greater" in err


def test_no_config_means_the_defaults():
    s = RegistrySettings()
    assert (s.broker.host, s.broker.port, s.broker.client_id) == (
        "127.0.0.1",
        1883,
        "flowfleet-registry",
    )
    assert (s.http.port, s.http.threads, s.http.proxy_hops) == (8080, 8, 0)


def test_the_documented_example_is_valid(tmp_path):
    """docs/registry.md's example config validates (its files need not exist here)."""
    text = DOCS.read_text()
    match = re.search(r"## Config file.*?```toml\n(.*?)```", text, re.S)
    assert match, "docs/registry.md has no ```toml example under 'Config file'"
    path = tmp_path / "registry.toml"
    path.write_text(match.group(1))
    s = load_registry_config(path, check=False)
    assert s.broker.username == "registry" and s.broker.ca_file
