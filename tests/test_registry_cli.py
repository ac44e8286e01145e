"""`flowfleet registry models|keys|users|tokens`, in-process, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json

import pytest

from flowfleet import signing
from flowfleet.cli import build_parser, main
from flowfleet.registry.cli.main import cmd_registry
from flowfleet.registry.store import db as regdb
from flowfleet.registry.testing import KINDS, release, temporary_database

TFLITE = "yolov8n_full_integer_quant.tflite"
ONNX = "yolov8n_int8.onnx"


@pytest.fixture(params=KINDS)
def cli(request, tmp_path, capsys):
    """Run `flowfleet registry ...` against one database; returns (rc, stdout, stderr)."""
    with temporary_database(request.param, tmp_path) as url:
        state = tmp_path / "state"

        def run(*argv: str):
            release()  # each invocation opens the database afresh, like a new process
            rc = main(["registry", *argv, "--db", url, "--state-dir", str(state)])
            out, err = capsys.readouterr()
            return rc, out, err

        run.state = state
        yield run


def test_run_is_still_the_default_action():
    args = build_parser().parse_args(["registry", "--db", "x.db", "--broker-port", "1884"])
    assert args.func is cmd_registry
    assert (args.db, args.broker_port) == ("x.db", 1884)
    # A flag left out is None: the config file's value or the model's default applies.
    assert args.anonymous_read is None
    args = build_parser().parse_args(["registry", "--db", "a.db", "models", "list"])
    assert args.db == "a.db", "shared options before the action are kept"


def test_models_add_list_alias_delete(cli, data):
    models = data / "models"
    rc, out, _ = cli(
        "models",
        "add",
        str(models / TFLITE),
        "--name",
        "yolo",
        "--tag",
        "int8",
        "--alias",
        "staging",
    )
    assert rc == 0 and "registered yolo version 1: tflite" in out and "alias staging" in out
    rc, out, _ = cli("models", "add", str(models / TFLITE), "--name", "yolo")
    assert rc == 0 and "already registered as yolo version 1" in out
    rc, out, _ = cli(
        "models", "add", str(models / ONNX), "--name", "yolo", "--notes", "onnx export"
    )
    assert rc == 0 and "version 2: onnx" in out

    rc, out, _ = cli("models", "list")
    assert "yolo" in out and "staging->1" in out
    rc, out, _ = cli("models", "show", "yolo", "staging")
    shown = json.loads(out)
    assert (shown["version"], shown["tags"]) == (1, ["int8"])

    rc, _, err = cli("models", "delete", "yolo", "1")
    assert rc == 1 and "aliased as staging" in err
    assert cli("models", "alias", "yolo", "staging", "2")[0] == 0
    assert cli("models", "delete", "yolo", "1", "--reason", "superseded")[0] == 0
    rc, out, _ = cli("models", "audit", "--target", "model:yolo")
    assert "version.delete" in out and "superseded" in out and "cli:" in out


@pytest.mark.parametrize(
    ("file", "words"),
    [("coco_labels.txt", "not a model file"), ("missing.tflite", "no such file")],
)
def test_models_add_refuses_with_one_line_and_exit_2(cli, data, file, words):
    rc, out, err = cli("models", "add", str(data / "models" / file))
    assert rc == 2
    assert words in err and len(err.strip().splitlines()) == 1
    assert out == ""


def test_users_tokens_and_key_rotation(cli, data):
    assert cli("users", "add", "alice", "--role", "operator")[0] == 0
    rc, _, err = cli("users", "add", "alice", "--role", "viewer")
    assert rc == 2 and "already exists" in err
    rc, out, _ = cli("tokens", "create", "alice", "--label", "laptop", "--ttl-days", "30")
    secret = out.strip()
    assert rc == 0 and secret.startswith("ffr_")
    rc, out, _ = cli("tokens", "list")
    assert "alice" in out and secret not in out and "laptop" in out
    assert cli("tokens", "revoke", "1")[0] == 0
    assert "revoked" in cli("tokens", "list")[1]
    assert "alice" in cli("users", "list")[1]

    cli("models", "add", str(data / "models" / TFLITE), "--name", "yolo")
    keys = list((cli.state / "keys").iterdir())
    assert len(keys) == 1 and keys[0].stat().st_mode & 0o777 == 0o600
    rc, out, _ = cli("keys", "rotate", "--overlap-days", "7")
    assert rc == 0 and "still accepted for 7 days" in out
    bundle_file = cli.state / "bundle.json"
    assert cli("keys", "export", "-o", str(bundle_file))[0] == 0
    bundle = signing.load_bundle(bundle_file)
    assert len(bundle) == 2
    rc, out, _ = cli("models", "show", "yolo", "1")
    version = json.loads(out)
    for sig in version["signatures"]:
        signing.verify_manifest(
            version["manifest"].encode(), sig["signature"], sig["key_id"], bundle
        )
    with_db = regdb.database_proxy.obj
    assert with_db is not None


def test_users_passwd_reads_stdin_and_device_tokens(cli, monkeypatch):
    from flowfleet.registry.http import websession

    assert cli("users", "add", "bob", "--role", "viewer")[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("a long passphrase\n"))
    rc, out, _ = cli("users", "passwd", "bob")
    assert rc == 0 and "password of bob set" in out
    with regdb.database_proxy.obj.connection_context():
        stored = regdb.User.get(regdb.User.name == "bob").password_hash
        actions = [e.action for e in regdb.AuditEntry.select()]
    assert stored.startswith("scrypt$") and "a long passphrase" not in stored
    assert websession.verify_password("a long passphrase", stored)
    assert "user.password" in actions
    for stdin, words in (("short\n", "at least 8 characters"), ("", "no password on stdin")):
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        rc, _, err = cli("users", "passwd", "bob")
        assert rc == 2 and words in err
    with pytest.raises(SystemExit):  # never from argv
        build_parser().parse_args(["registry", "users", "passwd", "bob", "secret-pass"])
    monkeypatch.setattr("sys.stdin", io.StringIO("a long passphrase\n"))
    rc, _, err = cli("users", "passwd", "nobody")
    assert rc == 2 and "no user 'nobody'" in err
    assert "bob" in cli("users", "list")[1]

    rc, out, err = cli("tokens", "create", "bob", "--device", "cam-7", "--label", "pi")
    assert rc == 0 and out.strip().startswith("ffr_") and "device cam-7" in err
    rc, out, _ = cli("tokens", "list")
    assert "device:cam-7" in out and "pi" in out
    rc, _, err = cli("tokens", "create", "bob", "--device", "cam-7", "--role", "viewer")
    assert rc == 2 and "no role" in err


def test_groups_set_list_show_delete_and_target_hardware(cli, data):
    rc, out, _ = cli("groups", "set", "lobby", "cam-2", "cam-1", "--reason", "site A")
    assert rc == 0 and "group lobby created: 2 device(s)" in out
    rc, out, _ = cli("groups", "set", "lobby", "cam-3")
    assert rc == 0 and "group lobby updated: 1 device(s)" in out
    rc, out, _ = cli("groups", "list")
    assert rc == 0 and out.split("\t")[0] == "lobby" and "cam-3" in out
    rc, out, _ = cli("groups", "show", "lobby")
    assert rc == 0 and json.loads(out)["devices"] == ["cam-3"]
    rc, _, err = cli("groups", "set", "lobby", "bad/id")
    assert rc == 2 and "devices:" in err
    rc, _, err = cli("groups", "show", "nope")
    assert rc == 1 and "no device group 'nope'" in err
    rc, out, _ = cli("groups", "delete", "lobby")
    assert rc == 0
    rc, out, _ = cli("groups", "list", "--json")
    assert rc == 0 and json.loads(out) == []

    model = str(data / "models" / TFLITE)
    rc, out, _ = cli(
        "models", "add", model, "--name", "y", "--target", "rpi5", "--target", "x86_64"
    )
    assert rc == 0
    rc, out, _ = cli("models", "show", "y", "1")
    assert json.loads(out)["target"] == ["rpi5", "x86_64"]
