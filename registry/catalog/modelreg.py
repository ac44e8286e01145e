"""The model registry: versions, aliases, signatures and the audit trail.

`ModelRegistry` is used by the REST API and the CLI alike; every method that changes
something takes the acting principal's name (``actor``) and an optional ``reason``
and writes an audit entry in the same transaction as the change. Errors are
`RegistryError` with an HTTP status, a machine-readable code and the offending field,
which the API answers as ``{"error": {"code", "message", "field"}}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import peewee as pw

from flowfleet import signing
from flowfleet.contract import is_valid_name

from .. import metrics
from ..errors import (  # re-exported: the registry's public error API
    RegistryError,
    check_name,
)
from ..fleet.deployments import DeploymentsMixin
from ..store.audit import audit
from ..store.db import (
    Alias,
    AuditEntry,
    Deployment,
    ModelVersion,
    RegistryModel,
    Signature,
    is_postgres_url,
    now,
)
from .artifacts import LocalStore, S3Store, open_store
from .formats import FormatError, inspect_model
from .keys import DEFAULT_OVERLAP_S, KeyRing

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAX_UPLOAD = 512 * MIB
MAX_NOTES = 10_000
MAX_TAGS = 32
MAX_FILENAME = 255
DEFAULT_PAGE = 100
MAX_PAGE = 1000

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=+-]{0,63}$")


def check_filename(filename: str | None) -> str:
    """The uploaded file's base name, refusing anything that is or hides a path."""
    if not filename:
        raise RegistryError(400, "invalid_filename", "the upload has no file name", "file")
    bad = (
        "/" in filename
        or "\\" in filename
        or ".." in filename
        or filename.startswith(".")
        or ":" in filename
        or any(ord(c) < 32 or ord(c) == 127 for c in filename)
        or len(filename) > MAX_FILENAME
    )
    if bad:
        raise RegistryError(
            400,
            "invalid_filename",
            f"file name {filename!r} is refused: it must be a plain name without path "
            "separators, '..', ':', control characters or a leading dot",
            "file",
        )
    return filename


def check_tags(tags: list[str] | tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for tag in tags:
        if not _TAG.match(tag):
            raise RegistryError(400, "invalid_parameter", f"{tag!r} is not a valid tag", "tags")
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise RegistryError(400, "invalid_parameter", f"at most {MAX_TAGS} tags", "tags")
    return out


MAX_TARGETS = 16


def check_target(target: list[str] | tuple[str, ...], field: str = "target") -> list[str]:
    """Target hardware names (e.g. ``rpi5``, ``jetson-orin``, ``aarch64``), de-duplicated
    and sorted; 400 naming ``field`` for a bad one."""
    if isinstance(target, str) or not all(isinstance(t, str) for t in target):
        raise RegistryError(400, "invalid_field", f"{field} must be a list of names", field)
    out = sorted({check_name(t, field, "target hardware name") for t in target})
    if len(out) > MAX_TARGETS:
        raise RegistryError(
            400, "invalid_field", f"at most {MAX_TARGETS} target hardware names", field
        )
    return out


def check_notes(notes: str | None) -> str:
    notes = notes or ""
    if len(notes) > MAX_NOTES:
        raise RegistryError(400, "invalid_parameter", f"notes longer than {MAX_NOTES}", "notes")
    return notes


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(MIB):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class RegistryConfig:
    """Where a registry keeps its artifacts and keys, and its limits."""

    artifacts: str  # directory or s3://bucket/prefix
    key_dir: Path
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    s3_endpoint_url: str | None = None

    @classmethod
    def beside(cls, database: str | Path, **overrides: Any) -> RegistryConfig:
        """Defaults next to a SQLite file (``<stem>-data/``) or in ``./flowfleet-registry-data``."""
        if is_postgres_url(database):
            base = Path("flowfleet-registry-data")
        else:
            from ..store.db import sqlite_path

            p = sqlite_path(database)
            base = p.with_name(f"{p.stem}-data")
        values: dict[str, Any] = {
            "artifacts": str(base / "artifacts"),
            "key_dir": base / "keys",
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["key_dir"] = Path(values["key_dir"])
        values["artifacts"] = str(values["artifacts"])
        return cls(**values)


class ModelRegistry(DeploymentsMixin):
    """Model versions on one database, one artifact store and one key ring."""

    def __init__(
        self,
        db: pw.Database,
        store: LocalStore | S3Store,
        keys: KeyRing,
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
        staging_dir: str | Path | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.keys = keys
        self.max_upload_bytes = max_upload_bytes
        self.staging_dir = Path(staging_dir) if staging_dir else None

    @classmethod
    def from_config(cls, db: pw.Database, config: RegistryConfig) -> ModelRegistry:
        store = open_store(config.artifacts, endpoint_url=config.s3_endpoint_url)
        staging = store.root / "incoming" if isinstance(store, LocalStore) else None
        return cls(
            db,
            store,
            KeyRing(config.key_dir),
            max_upload_bytes=config.max_upload_bytes,
            staging_dir=staging,
        )

    def start(self) -> None:
        """Create the first signing key if there is none (call at service start)."""
        with self.db.connection_context():
            self.keys.ensure_key()

    # -- uploads ------------------------------------------------------------------------

    def staged_copy(self, stream: BinaryIO) -> Path:
        """Copy an upload stream to a temporary file, refusing it past the size limit."""
        if self.staging_dir is not None:
            self.staging_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="upload-", dir=self.staging_dir)
        total = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while block := stream.read(MIB):
                    total += len(block)
                    if total > self.max_upload_bytes:
                        raise self._too_large()
                    out.write(block)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def _too_large(self) -> RegistryError:
        return RegistryError(
            413,
            "too_large",
            f"the model is larger than the upload limit ({self.max_upload_bytes} bytes)",
            "file",
        )

    def add_version(
        self,
        src: str | Path,
        *,
        name: str,
        filename: str,
        actor: str,
        notes: str = "",
        tags: list[str] | tuple[str, ...] = (),
        alias: str | None = None,
        labels: list[str] | None = None,
        target: list[str] | tuple[str, ...] | None = None,
        reason: str = "",
    ) -> tuple[ModelVersion, bool]:
        """Register the file at ``src`` as the next version of model ``name``.

        ``target`` is the hardware the model is built for, from the upload's manifest
        (an .eim defaults to the CPU architecture in its ELF header). It is stored in
        the metadata as ``target``, so it is covered by the signature.

        Returns (version, created). Bytes the registry already holds return the
        existing version with created=False and change nothing.
        """
        try:
            version, created = self._add_version(
                src, name, filename, actor, notes, tags, alias, labels, target, reason
            )
        except RegistryError:
            metrics.UPLOADS.labels(result="refused", runtime="").inc()
            raise
        result = "created" if created else "duplicate"
        metrics.UPLOADS.labels(result=result, runtime=version.runtime).inc()
        return version, created

    def _add_version(self, src, name, filename, actor, notes, tags, alias, labels, target, reason):
        check_name(name, "name", "model name")
        filename = check_filename(filename)
        notes = check_notes(notes)
        tags = check_tags(list(tags))
        targets = check_target(list(target)) if target is not None else None
        if alias is not None:
            check_name(alias, "alias", "alias name")
        src = Path(src)
        size = src.stat().st_size
        if size > self.max_upload_bytes:
            raise self._too_large()
        digest = sha256_file(src)
        existing = self._by_sha(digest)
        if existing is not None:
            return existing, False
        try:
            meta = inspect_model(src, labels=labels)
        except FormatError as exc:
            raise RegistryError(422, "invalid_model", f"{filename}: {exc}", "file") from None
        runtime = meta.pop("runtime")
        if targets is None and meta.get("target_arch"):
            targets = [meta["target_arch"]] if is_valid_name(meta["target_arch"]) else None
        if targets:
            meta["target"] = targets
        self.store.put(src, digest)
        try:
            with self.db.atomic():
                version = self._insert_version(
                    name, digest, size, runtime, filename, meta, notes, tags, actor, reason
                )
                if alias is not None:
                    self._move_alias(version.model, alias, version, actor, reason)
        except pw.IntegrityError:
            # The same bytes registered concurrently: theirs won, report it.
            existing = self._by_sha(digest)
            if existing is None:
                raise
            return existing, False
        return version, True

    def _by_sha(self, digest: str) -> ModelVersion | None:
        return (
            ModelVersion.select(ModelVersion, RegistryModel)
            .join(RegistryModel)
            .where(ModelVersion.sha256 == digest)
            .first()
        )

    def _insert_version(
        self, name, digest, size, runtime, filename, meta, notes, tags, actor, reason
    ):
        t = now()
        model = RegistryModel.get_or_none(RegistryModel.name == name)
        if model is None:
            RegistryModel.insert(
                name=name, created_at=t, created_by=actor, last_version=0
            ).on_conflict_ignore().execute()
            audit(actor, "model.create", f"model:{name}", reason)
        # Atomic increment: concurrent uploads to one model get distinct numbers.
        RegistryModel.update(last_version=RegistryModel.last_version + 1).where(
            RegistryModel.name == name
        ).execute()
        model = RegistryModel.get(RegistryModel.name == name)
        number = model.last_version
        manifest = signing.build_manifest(
            name=name,
            version=number,
            sha256=digest,
            size=size,
            runtime=runtime,
            filename=filename,
            metadata=meta,
            created_at=t,
        )
        version = ModelVersion.create(
            model=model,
            version=number,
            sha256=digest,
            size=size,
            runtime=runtime,
            filename=filename,
            metadata=json.dumps(meta, sort_keys=True),
            manifest=manifest.decode("utf-8"),
            notes=notes,
            tags=json.dumps(tags),
            created_at=t,
            created_by=actor,
        )
        self.keys.sign_version(version)
        audit(
            actor,
            "version.create",
            f"model:{name}/v{number}",
            reason,
            sha256=digest,
            size=size,
            runtime=runtime,
            filename=filename,
        )
        return version

    # -- lookups --------------------------------------------------------------------------

    def model(self, name: str) -> RegistryModel:
        model = RegistryModel.get_or_none(RegistryModel.name == name)
        if model is None:
            raise RegistryError(404, "unknown_model", f"no model {name!r}", "name")
        return model

    def version(self, name: str, ref: str | int) -> ModelVersion:
        """A version by number or by alias name."""
        model = self.model(name)
        text = str(ref)
        if text.isdigit():
            v = ModelVersion.get_or_none(
                ModelVersion.model == model, ModelVersion.version == int(text)
            )
            if v is None:
                raise RegistryError(
                    404, "unknown_version", f"model {name!r} has no version {text}", "version"
                )
            return v
        alias = Alias.get_or_none(Alias.model == model, Alias.name == text)
        if alias is None:
            raise RegistryError(
                404,
                "unknown_version",
                f"model {name!r} has no version or alias {text!r}",
                "version",
            )
        return alias.version

    def list_models(self, limit: int = DEFAULT_PAGE, offset: int = 0) -> tuple[list[dict], int]:
        total = RegistryModel.select().count()
        models = list(
            RegistryModel.select().order_by(RegistryModel.name).limit(limit).offset(offset)
        )
        ids = [m.id for m in models]
        counts: dict[int, tuple[int, int | None]] = {}
        aliases: dict[int, dict[str, int]] = {m.id: {} for m in models}
        if ids:
            for mid, n, top in (
                ModelVersion.select(
                    ModelVersion.model,
                    pw.fn.COUNT(ModelVersion.id),
                    pw.fn.MAX(ModelVersion.version),
                )
                .where(ModelVersion.model.in_(ids))
                .group_by(ModelVersion.model)
                .tuples()
            ):
                counts[mid] = (n, top)
            for mid, alias, number in (
                Alias.select(Alias.model, Alias.name, ModelVersion.version)
                .join(ModelVersion)
                .where(Alias.model.in_(ids))
                .order_by(Alias.name)
                .tuples()
            ):
                aliases[mid][alias] = number
        return [
            self.model_dict(m, *counts.get(m.id, (0, None)), aliases[m.id]) for m in models
        ], total

    def model_info(self, name: str) -> dict:
        m = self.model(name)
        n, top = (
            ModelVersion.select(pw.fn.COUNT(ModelVersion.id), pw.fn.MAX(ModelVersion.version))
            .where(ModelVersion.model == m)
            .tuples()
            .get()
        )
        aliases = dict(
            Alias.select(Alias.name, ModelVersion.version)
            .join(ModelVersion)
            .where(Alias.model == m)
            .order_by(Alias.name)
            .tuples()
        )
        return self.model_dict(m, n, top, aliases)

    @staticmethod
    def model_dict(m: RegistryModel, n: int, top: int | None, aliases: dict[str, int]) -> dict:
        return {
            "name": m.name,
            "created_at": m.created_at,
            "created_by": m.created_by,
            "versions": n,
            "latest_version": top,
            "aliases": aliases,
        }

    def list_versions(
        self, name: str, limit: int = DEFAULT_PAGE, offset: int = 0
    ) -> tuple[list[dict], int]:
        model = self.model(name)
        query = ModelVersion.select().where(ModelVersion.model == model)
        total = query.count()
        versions = list(query.order_by(ModelVersion.version.desc()).limit(limit).offset(offset))
        # Two queries for the whole page, not two per version.
        ids = [v.id for v in versions]
        aliases: dict[int, list[str]] = {i: [] for i in ids}
        sigs: dict[int, list[dict[str, str]]] = {i: [] for i in ids}
        if ids:
            for vid, alias in (
                Alias.select(Alias.version, Alias.name)
                .where(Alias.version.in_(ids))
                .order_by(Alias.name)
                .tuples()
            ):
                aliases[vid].append(alias)
            for vid, kid, sig in (
                Signature.select(Signature.version, Signature.key, Signature.signature)
                .where(Signature.version.in_(ids))
                .order_by(Signature.created_at.desc())
                .tuples()
            ):
                sigs[vid].append({"key_id": kid, "signature": sig})
        return [self.version_dict(v, model, aliases[v.id], sigs[v.id]) for v in versions], total

    def version_dict(
        self,
        v: ModelVersion,
        model: RegistryModel | None = None,
        aliases: list[str] | None = None,
        sigs: list[dict[str, str]] | None = None,
    ) -> dict:
        model = model or v.model
        if aliases is None:
            aliases = [
                a
                for (a,) in Alias.select(Alias.name)
                .where(Alias.version == v)
                .order_by(Alias.name)
                .tuples()
            ]
        if sigs is None:
            sigs = [
                {"key_id": kid, "signature": sig}
                for kid, sig in Signature.select(Signature.key, Signature.signature)
                .where(Signature.version == v)
                .order_by(Signature.created_at.desc())
                .tuples()
            ]
        metadata = json.loads(v.metadata)
        return {
            "model": model.name,
            "version": v.version,
            "sha256": v.sha256,
            "size": v.size,
            "runtime": v.runtime,
            "filename": v.filename,
            "metadata": metadata,
            "target": metadata.get("target", []),
            "notes": v.notes,
            "tags": json.loads(v.tags),
            "aliases": aliases,
            "created_at": v.created_at,
            "created_by": v.created_by,
            "manifest": v.manifest,
            "signatures": sigs,
        }

    # -- changes ---------------------------------------------------------------------------

    def update_version(
        self,
        name: str,
        number: int,
        *,
        actor: str,
        notes: str | None = None,
        tags: list[str] | None = None,
        reason: str = "",
    ) -> ModelVersion:
        with self.db.atomic():
            v = self.version(name, number)
            changes: dict[str, Any] = {}
            if notes is not None:
                changes["notes"] = {"old": v.notes, "new": check_notes(notes)}
                v.notes = changes["notes"]["new"]
            if tags is not None:
                new = check_tags(tags)
                changes["tags"] = {"old": json.loads(v.tags), "new": new}
                v.tags = json.dumps(new)
            v.save()
            audit(actor, "version.update", f"model:{name}/v{v.version}", reason, **changes)
        return v

    def set_alias(
        self, name: str, alias: str, number: int, *, actor: str, reason: str = ""
    ) -> Alias:
        check_name(alias, "alias", "alias name")
        with self.db.atomic():
            model = self.model(name)
            v = self.version(name, number)
            return self._move_alias(model, alias, v, actor, reason)

    def _move_alias(
        self, model: RegistryModel, alias: str, v: ModelVersion, actor: str, reason: str
    ) -> Alias:
        row = Alias.get_or_none(Alias.model == model, Alias.name == alias)
        old = row.version.version if row is not None else None
        t = now()
        if row is None:
            row = Alias.create(model=model, name=alias, version=v, updated_at=t, updated_by=actor)
        else:
            row.version = v
            row.updated_at = t
            row.updated_by = actor
            row.save()
        audit(
            actor, "alias.set", f"model:{model.name}/alias:{alias}", reason, old=old, new=v.version
        )
        return row

    def delete_alias(self, name: str, alias: str, *, actor: str, reason: str = "") -> None:
        with self.db.atomic():
            model = self.model(name)
            row = Alias.get_or_none(Alias.model == model, Alias.name == alias)
            if row is None:
                raise RegistryError(
                    404, "unknown_alias", f"model {name!r} has no alias {alias!r}", "alias"
                )
            old = row.version.version
            row.delete_instance()
            audit(actor, "alias.delete", f"model:{name}/alias:{alias}", reason, old=old)

    def delete_version(self, name: str, number: int, *, actor: str, reason: str = "") -> None:
        """Delete a version and its artifact; refused while an alias points at it."""
        with self.db.atomic():
            v = self.version(name, number)
            aliases = [a for (a,) in Alias.select(Alias.name).where(Alias.version == v).tuples()]
            if aliases:
                raise RegistryError(
                    409,
                    "version_in_use",
                    f"model {name!r} version {number} is aliased as {', '.join(sorted(aliases))}; "
                    "move or delete the alias first",
                    "version",
                )
            deployed = [
                f"{d}/{c}"
                for d, c in Deployment.select(Deployment.device, Deployment.camera)
                .where(Deployment.model == name, Deployment.version == v.version)
                .order_by(Deployment.device, Deployment.camera)
                .tuples()
            ]
            if deployed:
                raise RegistryError(
                    409,
                    "version_in_use",
                    f"model {name!r} version {number} is deployed to {', '.join(deployed)}; "
                    "deploy another version there first",
                    "version",
                )
            digest = v.sha256
            Signature.delete().where(Signature.version == v).execute()
            v.delete_instance()
            audit(actor, "version.delete", f"model:{name}/v{number}", reason, sha256=digest)
        self.store.delete(digest)

    def rotate_keys(self, *, actor: str, overlap_s: float = DEFAULT_OVERLAP_S, reason: str = ""):
        with self.db.atomic():
            new, old = self.keys.rotate(overlap_s)
            audit(
                actor,
                "key.rotate",
                f"key:{new.key_id}",
                reason,
                retired=[k.key_id for k in old],
                overlap_s=overlap_s,
            )
        return new, old

    # -- audit trail -----------------------------------------------------------------------

    def audit_log(
        self, limit: int = DEFAULT_PAGE, offset: int = 0, target: str | None = None
    ) -> tuple[list[dict], int]:
        query = AuditEntry.select()
        if target:
            # The target itself and everything under it ("model:x" covers "model:x/v1").
            query = query.where(
                (AuditEntry.target == target) | AuditEntry.target.startswith(target + "/")
            )
        total = query.count()
        rows = query.order_by(AuditEntry.id.desc()).limit(limit).offset(offset)
        return [
            {
                "id": e.id,
                "ts": e.ts,
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "reason": e.reason,
                "details": json.loads(e.details),
            }
            for e in rows
        ], total
