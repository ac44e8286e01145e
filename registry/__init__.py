"""The central registry: ingest, fleet state, model catalog, deployments, web UI and API.

One folder per subsystem, imports running downwards (``http`` and ``cli`` use
``fleet`` and ``catalog``, which use ``store``; nothing below imports ``http``):

- ``store/``: database connection and tables, migrations, named locks, audit trail;
- ``catalog/``: model versions, artifacts, formats, signing keys, watch folder;
- ``fleet/``: ingest and the end-to-end ack, dead letters, deployments, groups, the
  commands outbox (desired states published after commit);
- ``http/``: REST API, pages and templates, tokens, sessions, access rules, OpenAPI;
- ``cli/``: the ``flowfleet registry ...`` commands;
- ``service.py`` starts the pieces; ``errors.py`` and ``metrics.py`` are shared.
"""
