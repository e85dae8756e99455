"""Rate limits per user and action, held in PostgreSQL so they hold across replicas."""
