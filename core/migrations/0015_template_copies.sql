-- Cross-zone copies (copyTemplate, copyIso): a template's install in a zone other than its own
-- (templates.zone_id), with its own download state and fencing epoch. The id is the job id the
-- destination's storage VM runs; one copy per template and zone.
CREATE TABLE template_copies (
    id TEXT PRIMARY KEY,
    template_id TEXT NOT NULL REFERENCES templates(id) ON DELETE CASCADE,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    store_id TEXT NOT NULL REFERENCES image_stores(id),
    source_zone_id TEXT NOT NULL,
    download_state TEXT NOT NULL,
    download_percent BIGINT NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    size BIGINT,
    physical_size BIGINT,
    installed_file TEXT,
    installed_sha256 TEXT,
    agent_id TEXT,
    dispatch_epoch BIGINT NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    removed TEXT,
    UNIQUE (template_id, zone_id)
);
