"""Device ids and broker usernames are contract names, checked wherever they enter:
the password file, the ACL's admins, device certificates and the agent's config. The
registry's identities are reserved: no device can be provisioned under them."""

from __future__ import annotations

import pytest

from flowfleet.agent.config import ConfigError, load_agent_config
from flowfleet.contract import ContractError
from flowfleet.identity import check_device_id, check_username, is_reserved
from flowfleet.provisioning.mosquitto import render_acl, write_password_file
from flowfleet.provisioning.pki import issue, make_ca

BAD_NAMES = [
    ("+", "not a valid name"),
    ("#", "not a valid name"),
    ("cam/1", "not a valid name"),
    ("cam:1", "not a valid name"),
    ("cam 1", "not a valid name"),
    ("", "not a valid name"),
    ("-cam", "not a valid name"),
    ("../etc", "not a valid name"),
    ("cam\n1", "not a valid name"),
    ("x" * 65, "not a valid name"),
    ("caméra", "not a valid name"),
]
RESERVED = ["registry", "Registry", "registry-1", "registry_eu", "registry.2", "flowfleet-registry"]
DEVICES = ["cam-1", "lobby.cam_2", "registrycam", "my-registry", "x" * 64]


@pytest.mark.parametrize("name", RESERVED)
def test_reserved_names(name):
    assert is_reserved(name)
    assert check_username(name) == name  # a valid broker identity, for the registry
    with pytest.raises(ContractError, match="reserved for the registry's own identities"):
        check_device_id(name)


@pytest.mark.parametrize("name", DEVICES)
def test_device_names(name):
    assert not is_reserved(name)
    assert check_device_id(name) == name


# -- provisioning: password file, ACL admins, device certificates --------------------


@pytest.mark.parametrize(("user", "message"), BAD_NAMES)
def test_password_file_refuses_bad_users_and_writes_nothing(tmp_path, user, message):
    path = tmp_path / "passwd"
    with pytest.raises(ValueError, match=message) as err:
        write_password_file(path, {"registry": "r", user: "pw"})
    assert "password file user" in str(err.value)
    assert not path.exists()


def test_password_file_takes_devices_and_the_registry(tmp_path):
    path = write_password_file(
        tmp_path / "passwd", {"registry": "r", "registry-2": "s", "cam-1": "c"}
    )
    assert [line.split(":")[0] for line in path.read_text().splitlines()] == [
        "registry",
        "registry-2",
        "cam-1",
    ]


@pytest.mark.parametrize(
    ("admins", "message"),
    [
        (("+",), "ACL admin '\\+' is not a valid name"),
        (("registry", "#"), "ACL admin '#' is not a valid name"),
        (("ops",), "not one of the registry's reserved identities"),
        (("cam-1",), "not one of the registry's reserved identities"),
    ],
)
def test_acl_admins_must_be_reserved_registry_identities(admins, message):
    with pytest.raises(ValueError, match=message):
        render_acl(admins=admins)


def test_acl_for_several_ingest_workers():
    acl = render_acl(admins=("registry", "registry-1", "registry-2"))
    for user in ("registry", "registry-1", "registry-2"):
        assert f"user {user}\ntopic read flowfleet/v1/devices/#\n" in acl


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.mark.parametrize(
    ("cn", "registry", "message"),
    [
        *[(name, False, message) for name, message in BAD_NAMES],
        ("registry", False, "device certificate CN 'registry' is reserved"),
        ("registry-1", False, "device certificate CN 'registry-1' is reserved"),
        ("flowfleet-registry", False, "is reserved"),
        ("cam-1", True, "registry certificate CN 'cam-1' is not one of the registry's"),
        ("#", True, "registry certificate CN '#' is not a valid name"),
    ],
)
def test_certificates_refuse_bad_and_reserved_common_names(ca, tmp_path, cn, registry, message):
    with pytest.raises(ValueError, match=message):
        issue(ca, cn, tmp_path, registry=registry)
    assert list(tmp_path.iterdir()) == []


def test_certificates_for_a_device_and_for_the_registry(ca, tmp_path):
    assert issue(ca, "cam-1", tmp_path).cert.name == "cam-1.crt"
    assert issue(ca, "registry-1", tmp_path, registry=True).cert.name == "registry-1.crt"
    # A server certificate's CN is a host name, not an identity.
    assert issue(ca, "mqtt.example.org", tmp_path, server=True).cert.name == "server.crt"


# -- the agent's config ----------------------------------------------------------------

CONFIG = """
device_id = "{device}"

[broker]
username = "{username}"

[[cameras]]
name = "door"
source = "video.mp4"
model = "model.tflite"
"""


@pytest.mark.parametrize(
    ("device", "username", "message"),
    [
        ("+", "cam-1", "device_id: String should match pattern"),
        ("#", "cam-1", "device_id: String should match pattern"),
        ("registry", "cam-1", "device_id: device id 'registry' is reserved for the registry"),
        ("registry-1", "cam-1", "device_id: device id 'registry-1' is reserved"),
        ("Flowfleet-Registry", "cam-1", "device_id: device id 'Flowfleet-Registry' is reserved"),
        ("cam-1", "+", "broker.username: username '\\+' is not a valid name"),
        ("cam-1", "#", "broker.username: username '#' is not a valid name"),
        ("cam-1", "cam/1", "broker.username: username 'cam/1' is not a valid name"),
        ("cam-1", "", "broker.username: username '' is not a valid name"),
        ("cam-1", "registry", "broker.username: username 'registry' is reserved"),
        ("cam-1", "registry-2", "broker.username: username 'registry-2' is reserved"),
    ],
)
def test_agent_config_refuses_bad_and_reserved_identities(tmp_path, device, username, message):
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG.format(device=device, username=username))
    with pytest.raises(ConfigError, match=message) as err:
        load_agent_config(path)
    assert str(err.value).startswith(f"{path}: ")


def test_agent_config_takes_a_device_identity(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG.format(device="cam-1", username="cam-1"))
    config = load_agent_config(path)
    assert (config.device_id, config.broker.username) == ("cam-1", "cam-1")
