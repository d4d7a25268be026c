"""The harness's three expected failures. Each becomes one line on stderr and a fixed exit code
(train_trl_grpo.main); anything else is a bug and keeps its traceback."""


class ConfigError(Exception):
    """A bad flag, value or combination: exit code 2."""


class DataError(Exception):
    """Missing or malformed data, a model or file that cannot be found: exit code 1."""


class EvalError(Exception):
    """Evaluation could not produce honest numbers (generation failed after retries): exit 1."""
