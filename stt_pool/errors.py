"""What can go wrong with a transcription, by meaning; the server maps each to one protocol error code."""


class SttError(Exception):
    """The speech-to-text service failed (maps to STT_SERVICE_ERROR)."""


class SttOverloaded(SttError):
    """Every decoding process is at capacity; the new recording was refused (STT_OVERLOADED)."""


class BufferFull(SttError):
    """The runtime directory has no space left for more audio of this recording (STT_SERVICE_ERROR)."""


class SttTimeout(SttError):
    """The final transcript did not arrive within STT_TIMEOUT (SERVICE_TIMEOUT)."""


class AudioTooLong(SttError):
    """The recording reached its maximum length; what came before is kept (AUDIO_TOO_LONG)."""


class SampleRateChanged(SttError):
    """A recording's sample rate cannot change once audio has been received (INVALID_EVENT_DATA)."""


class InvalidModel(Exception):
    """A model directory that cannot be a Vosk model; found before anything starts."""
