"""The registry's storage: database connection and tables, schema migrations, named
locks and the audit trail. Everything else in the registry builds on it. It imports
nothing else of the registry, except migration 7, which runs the fleet's ack
computation once for devices stored before it."""
