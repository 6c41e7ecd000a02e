-- Core-managed system VMs (drivers), events, and the leader lease of core's HA.
-- managed = 1: core starts/stops the VM through its driver; desired is what core keeps it at
-- (Running | Stopped | Destroyed); pid is the process driver's process id.
ALTER TABLE system_vms ADD COLUMN managed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE system_vms ADD COLUMN desired TEXT;
ALTER TABLE system_vms ADD COLUMN driver TEXT;
ALTER TABLE system_vms ADD COLUMN pid BIGINT;
ALTER TABLE system_vms ADD COLUMN started_ms BIGINT;
ALTER TABLE system_vms ADD COLUMN start_failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE system_vms ADD COLUMN idle_since_ms BIGINT;
ALTER TABLE system_vms ADD COLUMN removed TEXT;
CREATE TABLE events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    level TEXT NOT NULL,
    description TEXT NOT NULL,
    resource_id TEXT,
    zone_id TEXT,
    created TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX events_created ON events (created_ms);
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);
