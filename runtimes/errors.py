"""Error types shared by the runtime and everything built on it.

Every error a user can cause derives from :class:`EdgeError`; the CLI turns one into a single
line on stderr and exit code 2. Messages name the file, tensor or option at fault and the fix.
"""


class EdgeError(Exception):
    """Base of every error the toolkit raises on purpose."""


class ConfigError(EdgeError):
    """A model configuration (config.json, GGUF metadata) is missing, malformed or unsupported."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture is not in the registry."""


class ArtifactError(EdgeError):
    """An artifact folder is incomplete, tampered with, or of an unknown format."""


class TokenizerError(EdgeError):
    """A tokenizer or chat template cannot be built or rendered."""


class SamplingError(EdgeError):
    """A sampling option (temperature, top_p, top_k, max_new_tokens, thinking_budget, seed) is out of range."""


class ContextOverflowError(EdgeError):
    """A prompt or generation does not fit the model's context."""


class BackendUnavailableError(EdgeError):
    """A runtime backend cannot run on this machine (missing package or platform)."""
