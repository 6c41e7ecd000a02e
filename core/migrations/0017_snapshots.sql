-- Volumes of libvirt guests beside those imported on pools (a guest disk has no pool: vm_id and
-- device name it), then snapshots and snapshot policies.
CREATE TABLE volumes_new (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    pool_id TEXT REFERENCES storage_pools(id),
    vm_id TEXT,
    device TEXT,
    vol_type TEXT NOT NULL DEFAULT 'DATADISK',
    account_id TEXT NOT NULL,
    path TEXT NOT NULL,
    format TEXT NOT NULL,
    size BIGINT NOT NULL,
    created TEXT NOT NULL,
    UNIQUE (pool_id, path),
    UNIQUE (vm_id, device)
);
INSERT INTO volumes_new (id, name, zone_id, pool_id, account_id, path, format, size, created)
    SELECT id, name, zone_id, pool_id, account_id, path, format, size, created FROM volumes;
DROP TABLE volumes;
ALTER TABLE volumes_new RENAME TO volumes;
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    volume_id TEXT NOT NULL,
    volume_name TEXT NOT NULL,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    account_id TEXT NOT NULL,
    store_url TEXT,
    state TEXT NOT NULL,
    interval_type TEXT NOT NULL,
    policy_id TEXT,
    parent_id TEXT,
    file TEXT,
    checkpoint TEXT,
    virtual_size BIGINT NOT NULL DEFAULT 0,
    physical_size BIGINT NOT NULL DEFAULT 0,
    bytes_read BIGINT NOT NULL DEFAULT 0,
    sha256 TEXT,
    error TEXT,
    created TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX snapshots_volume ON snapshots (volume_id, created_ms);
CREATE TABLE snapshot_policies (
    id TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL,
    interval_type TEXT NOT NULL,
    schedule TEXT NOT NULL,
    timezone TEXT NOT NULL,
    max_snaps BIGINT NOT NULL,
    for_display BIGINT NOT NULL DEFAULT 1,
    next_run_ms BIGINT NOT NULL,
    created TEXT NOT NULL,
    UNIQUE (volume_id, interval_type)
);
