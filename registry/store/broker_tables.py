"""Broker access tables (schema migration 22): device passwords and revocations.

The registry generates the broker's password file and ACL from its device records
(`flowfleet.registry.fleet.broker_auth`). A device that cannot present a client
certificate gets a broker password; only its Mosquitto hash is stored here (the
plain password is handed to the device once, in its enrollment answer). A revoked
device keeps a row in ``device_revocation`` so the generated ACL leaves it out until
an operator lets it enroll again.
"""

from __future__ import annotations

import peewee as pw

from .db import BaseModel


class BrokerCredential(BaseModel):
    """A device's broker password, as the Mosquitto ``$7$`` hash the password file holds."""

    device = pw.CharField(primary_key=True, max_length=64)
    password_hash = pw.CharField(max_length=256)
    issued_at = pw.DoubleField()
    issued_by = pw.CharField(max_length=128)

    class Meta:
        table_name = "broker_credential"


class DeviceRevocation(BaseModel):
    """A device an operator revoked: no broker password, no ACL entry."""

    device = pw.CharField(primary_key=True, max_length=64)
    revoked_at = pw.DoubleField()
    revoked_by = pw.CharField(max_length=128)
    reason = pw.CharField(max_length=256, default="")

    class Meta:
        table_name = "device_revocation"


BROKER_MODELS = (BrokerCredential, DeviceRevocation)
