"""Errors the user caused. The CLI turns them into one line on stderr and exit status 2."""


class UserError(Exception):
    """A mistake in the user's input (config, override, name, path): shown as one line, exit 2."""


class ConfigError(UserError):
    """A config key is unknown, of the wrong type or out of range. `key` is the dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run ends FAILED (not a config mistake: exit status 1)."""

    run_status = "FAILED"
