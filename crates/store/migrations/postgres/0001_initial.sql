-- Tessera datastore, PostgreSQL. Kept in step with ../sqlite/0001_initial.sql: the same tables and
-- columns, so one set of queries serves both (booleans are BIGINT 0/1, sets are JSON text).

-- The one counter row. Every revisioned write increments it first; the write lock it takes
-- serializes writers so that revisions are assigned in commit order (see src/lib.rs).
-- pruned_through: events up to this revision have been deleted.
CREATE TABLE revision (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    value          BIGINT NOT NULL,
    pruned_through BIGINT NOT NULL
);
INSERT INTO revision (id, value, pruned_through) VALUES (1, 0, 0);

CREATE TABLE events (
    revision BIGINT PRIMARY KEY,
    kind     TEXT NOT NULL,
    key      TEXT NOT NULL
);

CREATE TABLE entries (
    id               TEXT PRIMARY KEY,
    spiffe_id        TEXT NOT NULL,
    parent_id        TEXT NOT NULL,
    selectors        TEXT NOT NULL,
    -- SHA-256 of (spiffe_id, parent_id, selectors): creating the same entry twice is idempotent.
    identity_key     TEXT NOT NULL UNIQUE,
    x509_ttl_secs    BIGINT NOT NULL,
    jwt_ttl_secs     BIGINT NOT NULL,
    dns_names        TEXT NOT NULL,
    hint             TEXT NOT NULL,
    admin            BIGINT NOT NULL,
    downstream       BIGINT NOT NULL,
    federates_with   TEXT NOT NULL,
    created_revision BIGINT NOT NULL,
    updated_revision BIGINT NOT NULL
);
CREATE INDEX entries_by_parent ON entries (parent_id, id);
CREATE INDEX entries_by_spiffe_id ON entries (spiffe_id, id);

-- One row per (entry, selector), for selector queries.
CREATE TABLE entry_selectors (
    entry_id TEXT NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    selector TEXT NOT NULL,
    PRIMARY KEY (entry_id, selector)
);
CREATE INDEX entry_selectors_by_selector ON entry_selectors (selector, entry_id);

CREATE TABLE agents (
    spiffe_id        TEXT PRIMARY KEY,
    attestation_type TEXT NOT NULL,
    selectors        TEXT NOT NULL,
    serial           TEXT NOT NULL,
    expires_at       BIGINT NOT NULL,
    banned           BIGINT NOT NULL,
    created_revision BIGINT NOT NULL,
    updated_revision BIGINT NOT NULL
);

-- Only the SHA-256 of each token (hex).
CREATE TABLE join_tokens (
    token_hash TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE INDEX join_tokens_by_expiry ON join_tokens (expires_at);

CREATE TABLE bundles (
    trust_domain     TEXT PRIMARY KEY,
    bundle           BYTEA NOT NULL,
    updated_revision BIGINT NOT NULL
);

CREATE TABLE ca_journals (
    server_id TEXT PRIMARY KEY,
    journal   BYTEA NOT NULL
);

CREATE TABLE federation_relationships (
    trust_domain        TEXT PRIMARY KEY,
    bundle_endpoint_url TEXT NOT NULL,
    profile             TEXT NOT NULL,
    endpoint_spiffe_id  TEXT,
    updated_revision    BIGINT NOT NULL
);

CREATE TABLE policies (
    id               TEXT PRIMARY KEY,
    document         TEXT NOT NULL,
    updated_revision BIGINT NOT NULL
);
