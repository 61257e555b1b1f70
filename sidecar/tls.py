"""TLS towards an ``https://`` control plane: the context that verifies its certificate."""

from __future__ import annotations

import ssl

from sidecar.errors import ConfigError


def client_context(ca_file: str) -> ssl.SSLContext:
    """A context that verifies the server's certificate and host name against the PEM bundle
    ``ca_file`` only (as ``curl --cacert`` does); with no file, against the system's trust
    store. A file that cannot be read or holds no certificate raises ConfigError naming
    ``ca_file``."""
    if not ca_file:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as e:
        raise ConfigError(
            "ca_file", f"{ca_file}: no PEM certificate could be loaded ({e.reason or e})"
        ) from None
    except OSError as e:
        raise ConfigError("ca_file", f"{ca_file}: {e.strerror or e}") from None
