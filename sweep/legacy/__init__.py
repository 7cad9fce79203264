"""The hand-kept experiment log (exp001-exp190): parsed, mapped onto TrainConfig keys, imported
as MLflow runs and, where an entry falls inside a search space, as completed trials of its study."""
from .importer import enqueue, entry_metrics, import_log
from .mapping import map_entry, resolve
from .parse import Entry, LogFormatError, parse_log

__all__ = ["Entry", "LogFormatError", "entry_metrics", "enqueue", "import_log", "map_entry", "parse_log", "resolve"]
