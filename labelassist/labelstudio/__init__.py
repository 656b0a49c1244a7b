"""Label Studio sync: push predictions as pre-annotations, pull the reviews back."""

from .client import Connection, LabelStudioClient, resolve_connection
from .project import (
           ImageSource,
           choice_result,
           label_config,
           list_remote_tasks,
           resolve_image_source,
)
from .pull import PullSummary, pull
from .push import PushSummary, push, record_tasks

__all__ = ["Connection", "ImageSource", "LabelStudioClient", "PullSummary", "PushSummary",
           "choice_result", "label_config", "list_remote_tasks", "pull", "push",
           "record_tasks", "resolve_connection", "resolve_image_source"]
