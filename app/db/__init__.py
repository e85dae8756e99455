"""Database: engine, session scope, embedded PostgreSQL, migrations."""
