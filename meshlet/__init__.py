"""The ``meshlet`` command: one entry point for the control plane, sidecar, ctl and demo."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("meshlet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
