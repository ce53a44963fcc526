"""The installed distribution's version, so it cannot drift from pyproject.toml."""

from importlib import metadata

try:
    __version__ = metadata.version("ciris-billing-proxy")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
