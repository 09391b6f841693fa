"""The one error type for a configuration the run cannot use (the message names the key)."""


class ConfigError(ValueError):
  """An invalid or inconsistent config value; the message names the config key."""
