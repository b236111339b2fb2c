"""Accounts, API tokens, contributed cases awaiting review, and the audit log.

The service's own tables (users with roles, hashed tokens, pending cases, audit
entries); the collection's tables are in :mod:`covidcxr.store.tables`. Passwords are
hashed with argon2id (argon2-cffi); API tokens are random and stored as their sha256.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Any, Final

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Connection,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from covidcxr.errors import MetadataError
from covidcxr.store.tables import Base, IngestLog

ROLES: Final = ("viewer", "contributor", "curator")
CASE_STATUSES: Final = ("pending", "accepted", "rejected")
TOKEN_PREFIX: Final = "cxr_"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class User(Base):
    """A person who may sign in: name, role, argon2 password hash (optional)."""

    __tablename__ = "users"
    __table_args__ = (CheckConstraint("role IN ('viewer', 'contributor', 'curator')", name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    """An API token of a user, stored as the sha256 of the token."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class PendingCase(Base):
    """A contributed case waiting for (or after) a curator's decision."""

    __tablename__ = "pending_cases"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'accepted', 'rejected')", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    submitted_by: Mapped[str] = mapped_column(String(64))
    submitted_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    folder: Mapped[str] = mapped_column(Text)
    case_metadata: Mapped[dict[str, Any]] = mapped_column(JSON)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    decided_by: Mapped[str | None] = mapped_column(String(64))
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str | None] = mapped_column(Text)


class AuditEntry(Base):
    """One write or decision: who, when, what (action and target), why."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)


def data_generation(conn: Connection) -> int:
    """A number that changes whenever the collection's data changes (the newest ingest
    run's id): the key under which the service may cache answers read from the store."""
    return int(conn.execute(select(func.max(IngestLog.id))).scalar() or 0)


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` (argon2-cffi's defaults)."""
    from argon2 import PasswordHasher

    return PasswordHasher().hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches the stored argon2 hash (False when there is none)."""
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    if not password_hash:
        return False
    try:
        return PasswordHasher().verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def token_sha256(token: str) -> str:
    """The stored form of an API token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_user(conn: Connection, name: str, role: str, password: str | None = None) -> str:
    """Create a user and return a new API token (shown once; only its hash is kept).

    Raises:
        MetadataError: a bad role, a blank or too long name, or the name is taken.
    """
    name = name.strip()
    if role not in ROLES:
        raise MetadataError(f"users add: role {role!r} is not one of {', '.join(ROLES)}")
    if not name or len(name) > 64 or not name.isprintable():
        raise MetadataError(f"users add: name {name!r} must be 1-64 printable characters")
    if conn.execute(select(User.id).where(User.name == name)).first() is not None:
        raise MetadataError(f"users add: user {name!r} exists; pick another name")
    user_id = conn.execute(
        insert(User)
        .values(
            name=name,
            role=role,
            password_hash=hash_password(password) if password else None,
            created_at=_now(),
        )
        .returning(User.id)
    ).scalar_one()
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        insert(ApiToken).values(
            user_id=user_id, token_sha256=token_sha256(token), created_at=_now()
        )
    )
    audit(conn, "admin", "user.add", f"user {name} ({role})")
    return token


def delete_user(conn: Connection, name: str) -> None:
    """Remove a user and their tokens.

    Raises:
        MetadataError: no such user.
    """
    user = find_user(conn, name)
    if user is None:
        raise MetadataError(f"users delete: no user {name!r}")
    conn.execute(delete(ApiToken).where(ApiToken.user_id == user["id"]))
    conn.execute(delete(User).where(User.id == user["id"]))
    audit(conn, "admin", "user.delete", f"user {name}")


def find_user(conn: Connection, name: str) -> dict[str, Any] | None:
    """The user row (id, name, role, password_hash) by name, or None."""
    row = conn.execute(select(User.__table__).where(User.name == name)).mappings().first()
    return None if row is None else dict(row)


def user_by_id(conn: Connection, user_id: int) -> dict[str, Any] | None:
    """The user row by id, or None (deleted)."""
    row = conn.execute(select(User.__table__).where(User.id == user_id)).mappings().first()
    return None if row is None else dict(row)


def user_for_token(conn: Connection, token: str) -> dict[str, Any] | None:
    """The user an API token belongs to, or None for an unknown (or deleted) token."""
    row = (
        conn.execute(
            select(User.__table__)
            .join(ApiToken, ApiToken.user_id == User.id)
            .where(ApiToken.token_sha256 == token_sha256(token))
        )
        .mappings()
        .first()
    )
    return None if row is None else dict(row)


def audit(
    conn: Connection, actor: str, action: str, target: str, reason: str | None = None
) -> None:
    """Append an entry to the audit log."""
    conn.execute(
        insert(AuditEntry).values(
            at=_now(), actor=actor, action=action, target=target, reason=reason
        )
    )


def audit_log(conn: Connection, limit: int = 200) -> list[dict[str, Any]]:
    """The newest audit entries first."""
    query = select(AuditEntry.__table__).order_by(AuditEntry.id.desc()).limit(limit)
    return [dict(row) for row in conn.execute(query).mappings()]


def add_case(
    conn: Connection, actor: str, folder: str, metadata: dict[str, Any], report: dict[str, Any]
) -> int:
    """Record a contributed case as pending; returns its id."""
    case_id = conn.execute(
        insert(PendingCase)
        .values(
            status="pending",
            submitted_by=actor,
            submitted_at=_now(),
            folder=folder,
            case_metadata=metadata,
            report=report,
        )
        .returning(PendingCase.id)
    ).scalar_one()
    audit(conn, actor, "case.submit", f"case {case_id}")
    return int(case_id)


def cases(conn: Connection, status: str | None = None) -> list[dict[str, Any]]:
    """Contributed cases, newest first, optionally of one status."""
    query = select(PendingCase.__table__).order_by(PendingCase.id.desc())
    if status is not None:
        query = query.where(PendingCase.status == status)
    return [dict(row) for row in conn.execute(query).mappings()]


def case(conn: Connection, case_id: int) -> dict[str, Any] | None:
    """One contributed case, or None."""
    query = select(PendingCase.__table__).where(PendingCase.id == case_id)
    row = conn.execute(query).mappings().first()
    return None if row is None else dict(row)


def decide_case(conn: Connection, case_id: int, actor: str, accept: bool, reason: str) -> None:
    """Mark a pending case accepted or rejected, with the reason, in the audit log.

    Raises:
        MetadataError: no such case, it was already decided, or the reason is blank.
    """
    found = case(conn, case_id)
    if found is None:
        raise MetadataError(f"cases: no case {case_id}")
    if found["status"] != "pending":
        raise MetadataError(f"cases: case {case_id} is already {found['status']}")
    if not reason.strip():
        raise MetadataError(f"cases: give a reason to accept or reject case {case_id}")
    status = "accepted" if accept else "rejected"
    conn.execute(
        update(PendingCase)
        .where(PendingCase.id == case_id)
        .values(status=status, decided_by=actor, decided_at=_now(), reason=reason.strip())
    )
    audit(conn, actor, f"case.{status[:-2]}", f"case {case_id}", reason.strip())


#: The service's tables (the collection's are in :mod:`covidcxr.store.tables`).
SERVICE_TABLES: Final = (User, ApiToken, PendingCase, AuditEntry)
