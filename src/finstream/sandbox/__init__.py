"""Local stand-ins for the delivery providers that cannot run here: FCM, APNs, Twilio.

Each speaks its provider's documented wire format (``reference/providers.md``),
including the error and throttling answers, and records what it accepted.
The tests start them as fakes (with fault switches, see :mod:`.base`); the
``sandbox`` role (:mod:`.server`) serves them to ``make run``'s delivery
workers and shows what arrived on a page. SendGrid, SES and SMTP fakes stay
with the tests (``tests/fakes/delivery``): the demo's email goes to Mailpit,
a real SMTP server.
"""
