"""HTTP and WebSocket service."""
