"""Credits: packages bought through Stripe, balances, the append-only ledger."""
