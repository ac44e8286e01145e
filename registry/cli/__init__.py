"""`flowfleet registry ...`: run the registry, and manage models, keys, users, tokens,
groups and dead letters from the command line."""
