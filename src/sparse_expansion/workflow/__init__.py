"""The jobs behind the CLI, usable from Python: sessions (model + windows), prune, expand, evaluate, compare,
and what they record (manifests, reports). One module per job."""

from ..models import ffn_costs
from .compare import Technique, compare, technique, techniques
from .jobs import evaluate, expand_session_model, prune_session_model
from .report import format_table, manifest, markdown_report
from .session import RunSettings, Session, open_session, session_for

__all__ = ["RunSettings", "Session", "Technique", "compare", "evaluate", "expand_session_model", "ffn_costs",
           "format_table", "manifest", "markdown_report", "open_session", "prune_session_model", "session_for",
           "technique", "techniques"]
