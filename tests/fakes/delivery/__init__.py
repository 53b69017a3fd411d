"""Local fake delivery providers, each speaking its provider's documented wire format.

SendGrid v3, SES v2 (SigV4 checked), FCM HTTP v1 with its OAuth2 token
endpoint, APNs over HTTP/2 (TLS + ALPN h2, ES256 provider tokens checked),
Twilio Messages, and a real SMTP server (aiosmtpd, STARTTLS and AUTH).

Every fake records what it *accepted* (``accepted``: one entry per message it
took, with the sender's message id), so tests count deliveries on the
provider's side, and has :class:`~.base.Faults` switches to inject the
provider's documented throttling and error answers, timeouts, and "accepted
but the answer never arrives".
"""
