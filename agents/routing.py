"""WebSocket routes (mounted by agentplatform.asgi under the session middleware)."""

from django.urls import re_path

from .consumers import AgentChatConsumer, NoRouteConsumer

websocket_urlpatterns = [
    re_path(r"^ws/agents/(?P<name>[^/]{1,64})/chat/?$", AgentChatConsumer.as_asgi()),
    # Anything else: a close code (4404) rather than the router raising for a client's typo.
    re_path(r"", NoRouteConsumer.as_asgi()),
]
