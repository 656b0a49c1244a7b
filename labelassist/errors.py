"""Every error a user can act on. The CLI prints one line and exits 1."""


class LabelAssistError(Exception):
    """Base class: the message says what happened and what to do."""


class ConfigError(LabelAssistError):
    """A bad option, setting or label file."""


class DatabaseError(LabelAssistError):
    """The database cannot be opened, is too new, or went away."""


class ModelLoadError(LabelAssistError):
    """A model could not be found or loaded."""


class LabelStudioError(LabelAssistError):
    """Label Studio refused, failed or could not be reached."""


class ExportError(LabelAssistError):
    """An export could not be written."""


class ClusterError(LabelAssistError):
    """A Ray cluster could not be reached, or could not run the work (predict --ray)."""
