"""Configuration: `load_settings()` builds the validated `Settings` once at start-up."""

from config.settings import PROJECT_ROOT, SERVICE_NAME, VERSION, ConfigError, Settings, load_settings

__all__ = ["PROJECT_ROOT", "SERVICE_NAME", "VERSION", "ConfigError", "Settings", "load_settings"]
