-- Two cores on one database: which core runs each async job, the cores alive now (heartbeats on
-- the database's clock), commands only the lease holder may carry out, and login sessions that
-- survive a restart or a failover.
ALTER TABLE async_jobs ADD COLUMN owner TEXT;
ALTER TABLE async_jobs ADD COLUMN leader_only BIGINT NOT NULL DEFAULT 0;
ALTER TABLE async_jobs ADD COLUMN params TEXT;
CREATE INDEX async_jobs_pending ON async_jobs (status, leader_only);
CREATE TABLE core_instances (
    id TEXT PRIMARY KEY,
    heartbeat_ms BIGINT NOT NULL,
    started TEXT NOT NULL
);
-- id_hash / key_hash: SHA-256 of the JSESSIONID and of the session key (neither is stored).
CREATE TABLE login_sessions (
    id_hash TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL,
    user_id TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    last_used_ms BIGINT NOT NULL
);
CREATE INDEX login_sessions_last_used ON login_sessions (last_used_ms);
