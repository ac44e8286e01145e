"""The fleet: ingest of what devices publish (with the end-to-end acknowledgement of
count bins and dead letters), deployments of models to devices, and device groups."""
