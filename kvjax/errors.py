"""Errors a user can cause. The CLIs print `error: <message>` and exit 2 for these."""


class KVJaxError(Exception):
    """A problem with user input (checkpoint, flag, prompt, file) with a message naming the fix."""


class CheckpointError(KVJaxError):
    """A model or compressor checkpoint is missing, corrupt or does not match."""


class PromptTooLong(KVJaxError):
    """A prompt that does not fit the KV cache (or a serving engine's sequence or pool)."""
