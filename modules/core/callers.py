"""Who is asking: the name jobs are owned by, and who may act on any job.

A client is the authenticated user when a login is configured for the face it came through
(HTTP Basic for the API, Gradio's login for the UI), else its address. Jobs carry their
owner's name (core/jobs.py); only the owner, an admin (``--admin-users``) or the only user of
a local server (no login configured and not reachable from the network) may interrupt or skip a
job and see its live preview and progress text.
"""
from __future__ import annotations

import argparse
import base64
import binascii

from modules.core import flags
from modules.core.jobs import Caller

__all__ = ["CallerPolicy", "basic_auth_user"]


def basic_auth_user(header: str | None) -> str | None:
    """The user name of an HTTP Basic ``Authorization`` header (not checked: the auth middleware did)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, _ = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return user if sep and user else None


def _first_user(credentials: str | None) -> str | None:
    """The user name of the first ``user:password`` pair of a credentials flag."""
    try:
        pairs = flags.parse_credentials(credentials or "")
    except flags.FlagError:   # also when none is given; a bad flag is reported where it is read
        return None
    return pairs[0][0] if pairs else None


class CallerPolicy:
    """Turns a request's (user, address) into a :class:`Caller`, from the flags."""

    def __init__(self, opts: argparse.Namespace):
        self.api_login = bool(getattr(opts, "api_auth", None) or getattr(opts, "gradio_auth", None)
                              or getattr(opts, "gradio_auth_path", None))
        self.admins = {name.strip() for name in (getattr(opts, "admin_users", None) or "").split(",") if name.strip()}
        if not self.admins:
            # Without --admin-users: the first --gradio-auth user (else the first --api-auth one) is the admin.
            first = _first_user(getattr(opts, "gradio_auth", None) or getattr(opts, "api_auth", None))
            self.admins = {first} if first else set()
        # Nobody else can reach the server and nobody logs in: its one user owns every job.
        self.single_user = not self.api_login and not flags.is_non_local(opts)

    def caller(self, user: str | None, address: str | None) -> Caller:
        """``user``: the authenticated user name (None when no login); ``address``: the client's host."""
        if user:
            return Caller(name=f"user:{user}", admin=self.single_user or user in self.admins)
        return Caller(name=f"addr:{address or 'unknown'}", admin=self.single_user)

    def api_caller(self, authorization: str | None, address: str | None) -> Caller:
        """The caller of an API request: its Basic user when the API requires a login."""
        return self.caller(basic_auth_user(authorization) if self.api_login else None, address)
