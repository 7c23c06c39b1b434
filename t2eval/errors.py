"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""


class T2EvalError(Exception):
    """An error caused by input the user can fix (config, paths, missing data/model, bad files)."""


class MissingDatasetError(T2EvalError):
    pass


class MissingModelError(T2EvalError):
    pass


class CorruptArtifactError(T2EvalError):
    pass
