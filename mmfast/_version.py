"""The package version (one place; pyproject.toml and setup.py repeat it, tests/test_package.py checks)."""

__version__ = "0.1.0"
