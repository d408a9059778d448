"""The release, in one place: the package, the wheel (pyproject reads it) and every manifest use it."""

__version__ = "0.1.0"
