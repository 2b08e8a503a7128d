-- warden schema, version 7: web console sessions.
--
-- A person logs in to the console once with an API key; warden checks the
-- key and stores a session that refers to the key's row. The key itself is
-- never stored, and the session token (the cookie's value, 256 random
-- bits) only as its SHA-256 hash, so a copy of this table opens nothing.
-- Scopes are read from the key at every use: revoking the key ends its
-- sessions on every replica at once, and deleting the key deletes them.
-- api_key_id is NULL only for sessions made while auth.enabled = false;
-- such sessions are refused once authentication is on.
CREATE TABLE warden.console_sessions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash  bytea NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    api_key_id  bigint REFERENCES warden.api_keys (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CHECK (expires_at > created_at)
);

CREATE INDEX console_sessions_expires_idx ON warden.console_sessions (expires_at);
CREATE INDEX console_sessions_key_idx ON warden.console_sessions (api_key_id);

COMMENT ON TABLE warden.console_sessions IS
    'Web console logins: SHA-256 of the session token, the API key it was opened with, and its expiry.';
