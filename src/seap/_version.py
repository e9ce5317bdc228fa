"""The package version, apart so that modules can record it without importing the package face."""

__version__ = "0.1.0"
