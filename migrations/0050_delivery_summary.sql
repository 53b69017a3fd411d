-- What a notification's journey shows of a message, without its body.
--
-- The API serves journeys (GET /v1/notifications/{id}/journey) but, by least
-- privilege, never reads message bodies (deliveries.message): the delivery
-- workers keep, beside the body, the locale it was rendered in, its subject
-- and the recipient masked, and the API may read those and the message's
-- state, but not the body. The journey's request-side story is the audit log.
ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS locale text;
ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS subject text;
ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS recipient_masked text;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'finstream_api') THEN
        GRANT SELECT ON audit_events, delivery_results TO finstream_api;
        GRANT SELECT (message_id, request_id, user_id, channel, state, attempts, provider,
                      created_at, finished_at, last_error, locale, subject, recipient_masked)
            ON deliveries TO finstream_api;
    END IF;
END
$$;
