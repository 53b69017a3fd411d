"""Notifications: users' preferences, the routing decisions made with them (consent,
quiet hours, caps, digests, holds), the templates messages are rendered from,
and the journey of a request through routing and delivery."""
