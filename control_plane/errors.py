"""Errors of the control plane.

    MeshletError
     ├── ApiError              a request the REST API refuses: HTTP status, message, field
     │    ├── BadRequest            400  malformed JSON or an invalid field
     │    ├── Unauthorized          401  no token, or one this control plane does not know
     │    ├── Forbidden             403  a token that may not do this (another service's)
     │    ├── NotFound              404  no such service, instance or token
     │    ├── Conflict              409  the request does not fit the state (a ring with
     │    │                              no endpoint, an instance a sidecar's stream owns,
     │    │                              a full registry, a lock still held or not
     │    │                              held by the token given)
     │    ├── PayloadTooLarge       413  body over the limit
     │    ├── UnsupportedMediaType  415  body that is not JSON
     │    └── TooManyRequests       429  too many lock acquisitions waiting at once
     ├── StoreError            the store failed (disk, corrupt file); the API answers 503
     └── ConfigError           bad flags, environment or store URL; the process exits 2

``wire.WireError`` (a document field is invalid) becomes ``BadRequest`` at the API boundary.
"""

from __future__ import annotations


class MeshletError(Exception):
    """Base of every error the control plane raises on purpose."""


class ApiError(MeshletError):
    status = 500

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, str | None]:
        return {"error": self.message, "field": self.field}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413


class UnsupportedMediaType(ApiError):
    status = 415


class StoreError(MeshletError):
    """The store could not do what was asked; nothing was changed."""


class ConfigError(MeshletError):
    """A start-up setting is wrong; ``field`` names the flag."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TooManyRequests(ApiError):
    status = 429
