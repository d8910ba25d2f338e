-- The destination map of transparent interception, owned by the server (`tessera destination`):
-- one row per named destination, its JSON document (cidr, ports, spiffe_id, tunnel_port).
CREATE TABLE destinations (
    id               TEXT PRIMARY KEY,
    document         TEXT NOT NULL,
    updated_revision BIGINT NOT NULL
);
