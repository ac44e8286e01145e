"""OpenAPI path of ``GET /api/live`` (`flowfleet.registry.http.live_api`)."""

from __future__ import annotations

from typing import Any

from .openapi import UNAUTH, _error

# One event of the stream (the schema of each event, as OpenAPI 3.2 and schemathesis
# read a text/event-stream).
EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["hello", "bins", "fleet", "bye"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}


def live_paths() -> dict[str, Any]:
    return {
        "/api/live": {
            "get": {
                "summary": "Server-Sent Events: when to re-read the API (dashboard access)",
                "description": "A text/event-stream: `retry`, then events `hello` "
                '({"lifetime_s", "tick_s"}), `bins` ({"bins", "last_bin_at"}: count bins '
                'arrived), `fleet` ({"devices"}: a device appeared, changed presence or '
                "reported a new state, or a rollout changed) and, when the stream's "
                "lifetime is over, `bye` (EventSource reconnects by itself). Events carry "
                "no figures: pages re-read the REST API. At most [http] live_streams are "
                "open at once; one more is refused with 503 and Retry-After (poll instead).",
                "security": [{"bearer": []}, {}],  # anonymous from localhost by default
                "responses": {
                    "200": {
                        "description": "the event stream (ends after [http] live_stream_s)",
                        "content": {"text/event-stream": {"schema": EVENT}},
                    },
                    "400": _error("a query parameter was given (there are none)"),
                    **UNAUTH,
                    "503": _error("too many live streams are open; poll the API instead"),
                },
            }
        }
    }
