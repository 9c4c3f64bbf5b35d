"""Errors of the export side. All derive from runtimes' EdgeError, which the CLI turns into one
line on stderr and exit code 2."""
from runtimes.errors import ArtifactError, ConfigError, EdgeError, UnsupportedArchitectureError  # noqa: F401


class CheckpointError(EdgeError):
    """A checkpoint file is missing, truncated, corrupted or inconsistent with its config."""


class ExportError(EdgeError):
    """An export cannot be produced (bad option, failed verification, no room on disk)."""


class VerificationError(ExportError):
    """An artifact's outputs disagree with the reference beyond the accepted threshold."""
