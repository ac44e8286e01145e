"""Cloud relays: forward what ingest stores to AWS IoT Core, Azure IoT Hub and Google
Cloud Pub/Sub, at least once, with a stable id per message (docs/relays.md).

- `settings`: the ``[relays]`` config section;
- `outbox`: the durable outbox ingest fills and the job empties;
- `base`: the interface each cloud module implements, and cost-aware packing;
- `job`: the relay job (retries, circuit breaker, parking, usage);
- `gcp`, `azure`, `aws`: one module per cloud; `provision`: their cloud resources;
- `usage` and `report`: what was forwarded and what it costs.
"""
