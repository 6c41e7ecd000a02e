-- Object stores (S3): the durable copies of what a zone's NFS staging stores hold. The secret
-- key is sealed with core's secrets key (row name object_stores/<id>).
CREATE TABLE object_stores (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    provider TEXT NOT NULL,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    endpoint TEXT NOT NULL,
    bucket TEXT NOT NULL,
    region TEXT NOT NULL,
    path_style BIGINT NOT NULL DEFAULT 1,
    access_key TEXT NOT NULL,
    secret_key TEXT NOT NULL,
    details TEXT NOT NULL,
    created TEXT NOT NULL,
    health TEXT NOT NULL DEFAULT 'Unknown',
    health_detail TEXT,
    health_checked_ms BIGINT NOT NULL DEFAULT 0
);
-- One row per artefact (template install, template copy, snapshot) per object store of its
-- zone. state: Pending | Replicating | Replicated | Failed | Deleting (the artefact is gone and
-- its object is being removed).
CREATE TABLE replicas (
    store_id TEXT NOT NULL REFERENCES object_stores(id),
    kind TEXT NOT NULL,
    artefact_id TEXT NOT NULL,
    zone_id TEXT NOT NULL,
    source_url TEXT NOT NULL,
    path TEXT NOT NULL,
    object_key TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL DEFAULT 0,
    parts BIGINT NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    error TEXT,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_try_ms BIGINT NOT NULL DEFAULT 0,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (store_id, kind, artefact_id)
);
-- NFS stores: Image (addImageStore) or ImageCache (createSecondaryStagingStore). Both hold
-- the staging copies downloads, uploads and backups write.
ALTER TABLE image_stores ADD COLUMN role TEXT NOT NULL DEFAULT 'Image';
-- The staging cache: a template's or ISO's copy on an ImageCache store may be evicted once
-- replicated (Present -> Evicting -> Evicted) and is fetched back on use (Evicted -> Fetching ->
-- Present); last_used_ms orders evictions (0: not seen yet).
ALTER TABLE templates ADD COLUMN staging TEXT NOT NULL DEFAULT 'Present';
ALTER TABLE templates ADD COLUMN last_used_ms BIGINT NOT NULL DEFAULT 0;
