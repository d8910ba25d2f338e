-- Tessera datastore, PostgreSQL: federation (issue 5). Kept in step with ../sqlite/0002_federation.sql.

-- https_web endpoints under a private CA: the PEM CA certificates that authenticate them
-- (NULL: the Mozilla root store).
ALTER TABLE federation_relationships ADD COLUMN ca_bundle_pem TEXT;
-- Fetch status, written by the refresher without a revision (nobody follows it; it is shown by
-- `tessera federation show`). Unix seconds; NULL: never.
ALTER TABLE federation_relationships ADD COLUMN last_attempt_at BIGINT;
ALTER TABLE federation_relationships ADD COLUMN last_success_at BIGINT;
ALTER TABLE federation_relationships ADD COLUMN last_error TEXT;
ALTER TABLE federation_relationships ADD COLUMN last_error_at BIGINT;
ALTER TABLE federation_relationships ADD COLUMN next_refresh_at BIGINT;
