"""kedit's adapter to Prefect, for the CLI (`kedit nightly`, `approve`, `reject`) and the Prefect tasks.

This is the one package under ``src/kedit`` that uses Prefect, and only the CLI commands (lazily, inside
the command) and ``tasks/`` import it; the core modules (refresh, lineage, editors, ...) never do, so
the library works without a Prefect server. ``approvals`` is plain Python (the deadline rules);
``runs`` talks to a server through Prefect's own client; ``stack`` starts a local server and workers.
"""

from kedit.orchestration.approvals import ApprovalRun, approval_timeout_of, past_deadline
from kedit.orchestration.runs import PrefectAPIError, PrefectRuns, expire_overdue, state_type
from kedit.orchestration.stack import LocalStack, free_port

__all__ = ["ApprovalRun", "LocalStack", "PrefectAPIError", "PrefectRuns", "approval_timeout_of",
           "expire_overdue", "free_port", "past_deadline", "state_type"]
