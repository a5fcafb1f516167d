"""Content-Security-Policy of the platform's own pages (the chat console, the cost dashboard).

django-csp writes the header (agentplatform.middleware.ContentSecurityPolicyMiddleware, its
middleware without a thread hop); a page opts in with one of the decorators here. The pages
load nothing but their own static files: no inline script or style, no eval, no CDN, no frames,
no plugins (data reaches their scripts through json_script blocks, which are not scripts to the
browser). `img-src data:` is for the console's empty favicon (data: images run no code).

The console also opens its WebSocket to the host it was served from. CSP 3 browsers count
ws:/wss: to the same host as 'self'; older ones do not, so connect-src also names
ws://<host> and wss://<host> of the request (SAME_HOST_WEBSOCKETS, filled in by the middleware).
"""

from __future__ import annotations

from csp.constants import NONE, SELF
from csp.decorators import csp

# Stands in connect-src for ws://<host> wss://<host>, the request's own host (see the middleware).
SAME_HOST_WEBSOCKETS = "<same-host-websockets>"

PAGE_POLICY: dict[str, list[str]] = {
    "default-src": [SELF],
    "script-src": [SELF],
    "style-src": [SELF],
    "img-src": [SELF, "data:"],
    "connect-src": [SELF],
    "object-src": [NONE],
    "base-uri": [SELF],
    "form-action": [SELF],
    "frame-ancestors": [NONE],
}

# A page of static files and same-origin fetches (the cost dashboard).
page_csp = csp(PAGE_POLICY)
# ...that also opens a WebSocket to its own host (the chat console).
websocket_page_csp = csp({**PAGE_POLICY, "connect-src": [SELF, SAME_HOST_WEBSOCKETS]})


def same_host_websockets(host: str) -> list[str]:
    """ws:// and wss:// of `host` (request.get_host(), validated against ALLOWED_HOSTS). An IPv6
    literal cannot be written in a CSP source expression: there 'self' must do."""
    if not host or "[" in host:
        return []
    return [f"ws://{host}", f"wss://{host}"]
