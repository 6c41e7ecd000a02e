-- Image stores, templates/ISOs, console targets and fleet-wide console session claims.
ALTER TABLE system_vms ADD COLUMN endpoint TEXT;
CREATE TABLE image_stores (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    provider TEXT NOT NULL,
    protocol TEXT NOT NULL,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    details TEXT,
    created TEXT NOT NULL
);
-- download_state: NOT_DOWNLOADED | DOWNLOAD_IN_PROGRESS | DOWNLOADED | DOWNLOAD_ERROR | ABANDONED
CREATE TABLE templates (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    display_text TEXT NOT NULL,
    is_iso BIGINT NOT NULL,
    format TEXT NOT NULL,
    hypervisor TEXT NOT NULL,
    url TEXT NOT NULL,
    checksum TEXT,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    store_id TEXT NOT NULL REFERENCES image_stores(id),
    account_id TEXT NOT NULL,
    is_public BIGINT NOT NULL DEFAULT 0,
    is_featured BIGINT NOT NULL DEFAULT 0,
    is_extractable BIGINT NOT NULL DEFAULT 0,
    bootable BIGINT NOT NULL DEFAULT 1,
    os_type_id TEXT,
    install_path TEXT NOT NULL,
    download_state TEXT NOT NULL,
    download_percent BIGINT NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    size BIGINT,
    physical_size BIGINT,
    installed_file TEXT,
    installed_sha256 TEXT,
    agent_id TEXT,
    created TEXT NOT NULL,
    removed TEXT
);
CREATE TABLE console_targets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    account_id TEXT NOT NULL,
    host TEXT NOT NULL,
    port BIGINT NOT NULL,
    password TEXT,
    created TEXT NOT NULL
);
CREATE TABLE console_sessions (
    session_id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    proxy_id TEXT NOT NULL,
    claimed TEXT NOT NULL,
    claimed_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX console_sessions_vm ON console_sessions (vm_id, claimed_ms);
