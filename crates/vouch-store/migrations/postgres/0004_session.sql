-- Grants for a POS app and a card reader to open a channel. The unique pair makes
-- each reader hello's nonce good for one grant, across instances.
CREATE TABLE reader_sessions (
    id             TEXT PRIMARY KEY,
    reader_id      TEXT NOT NULL REFERENCES devices(id),
    reader_nonce   TEXT NOT NULL,
    pos_device_id  TEXT NOT NULL REFERENCES devices(id),
    token_sid      TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    UNIQUE (reader_id, reader_nonce)
);
CREATE INDEX reader_sessions_by_pos ON reader_sessions (pos_device_id, created_at);
