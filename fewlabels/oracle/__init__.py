"""The label database ("oracle"): training labels are revealed here, recorded and counted."""

from fewlabels.oracle.database import (
    BudgetExceeded,
    LabelDatabaseError,
    Oracle,
    RunStats,
    check_recorded,
    default_url,
    distinct_ids_revealed,
    ensure_database,
    init_database,
    stats,
)

__all__ = [
    "BudgetExceeded", "LabelDatabaseError", "Oracle", "RunStats", "check_recorded", "default_url",
    "distinct_ids_revealed", "ensure_database", "init_database",
    "stats",
]
