"""Usage storage: the SQL store (tenants, ledger, audit) and, later, Redis counters."""
