-- Tessera datastore, SQLite: several servers of one trust domain (issue 8). Kept in step with ../postgres/0003_ha.sql.

-- What each server publishes of its CA: its authorities' public parts and which of them an
-- operator tainted (never a private key: those stay in each server's data_dir). The trust
-- domain's bundle is recomputed from every row, under the revision lock, whenever one changes.
CREATE TABLE server_authorities (
    server_id TEXT PRIMARY KEY,
    record    BLOB NOT NULL
);
