"""The errors a user can cause, each mapped by the `meml` command to exit code 2 with its
message (cli/app.py). Each message names the field, file, line or row to fix."""


class ConfigError(ValueError):
    """A config problem, with a message that names the field and how to fix it."""


class DataError(ValueError):
    """Bad input data, with a message naming the file, line or row and the field."""


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded, naming the path or id and why."""


class RewardConfigError(ValueError):
    """A reward function named in the config that cannot be imported or called."""
