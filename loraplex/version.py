"""The package version in one place (the server's /version reads it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loraplex")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"
