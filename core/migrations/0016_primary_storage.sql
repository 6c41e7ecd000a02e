-- Primary storage pools (createStoragePool, NFS exports) and the volumes core knows on them
-- (importVolume): what snapshots are taken of.
CREATE TABLE storage_pools (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    url TEXT NOT NULL,
    scope TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE volumes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    pool_id TEXT NOT NULL REFERENCES storage_pools(id),
    account_id TEXT NOT NULL,
    path TEXT NOT NULL,
    format TEXT NOT NULL,
    size BIGINT NOT NULL,
    created TEXT NOT NULL,
    UNIQUE (pool_id, path)
);
