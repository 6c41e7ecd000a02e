-- System VMs that dial in to core's agent endpoint, and core's own long-lived keys.
-- state is the lifecycle state core manages (Starting for a hand-registered VM);
-- agent_state is the agent channel: Up while connected and heartbeating, Disconnected otherwise.
CREATE TABLE system_vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    state TEXT NOT NULL,
    agent_state TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    last_heartbeat_ms BIGINT,
    last_load TEXT,
    software_version TEXT,
    disconnected TEXT,
    created TEXT NOT NULL
);
CREATE TABLE core_keys (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created TEXT NOT NULL
);
