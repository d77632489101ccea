"""Errors the user caused. The CLI turns them into one line on stderr and exit status 2."""


class UserError(Exception):
    """A mistake in the user's input (config, override, name, path): shown as one line, exit 2."""


class ConfigError(UserError):
    """A config key is unknown, of the wrong type or out of range. `key` is the dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def unknown_name(section: str, name, names) -> ConfigError:
    """model.name / data.name naming nothing registered (the registry and the early check say it alike)."""
    allowed = sorted(names)
    return ConfigError(f"{section}.name", f"unknown name {name!r}{did_you_mean(str(name), allowed)}; "
                                          f"choose one of: {', '.join(allowed)}")


def unknown_argument(section: str, name: str, key, arguments) -> ConfigError:
    """A model or data argument that the class's __init__ does not take."""
    allowed = ", ".join(arguments) or "(none)"
    return ConfigError(f"{section}.{key}", f"unknown argument for {section}.name={name!r}"
                                           f"{did_you_mean(str(key), arguments)}; allowed: {allowed}")


def did_you_mean(word: str, options) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run ends FAILED (not a config mistake: exit status 1)."""

    run_status = "FAILED"
