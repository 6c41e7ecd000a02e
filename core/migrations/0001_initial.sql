-- Initial schema. Portable SQL: the same text runs on SQLite and PostgreSQL.
-- Ids are UUID text; flags are BIGINT 0/1; dates are CloudStack-format TEXT (UTC).
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    account_type BIGINT NOT NULL,
    role_type TEXT NOT NULL,
    state TEXT NOT NULL,
    is_system BIGINT NOT NULL DEFAULT 0,
    created TEXT NOT NULL
);
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    email TEXT,
    firstname TEXT,
    lastname TEXT,
    api_key TEXT UNIQUE,
    secret_key TEXT,
    state TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE zones (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    network_type TEXT NOT NULL,
    allocation_state TEXT NOT NULL,
    dns1 TEXT,
    dns2 TEXT,
    internal_dns1 TEXT,
    internal_dns2 TEXT,
    domain TEXT,
    created TEXT NOT NULL
);
CREATE TABLE configurations (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE async_jobs (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    cmd TEXT NOT NULL,
    status BIGINT NOT NULL,
    result_code BIGINT NOT NULL,
    result TEXT,
    instance_type TEXT,
    instance_id TEXT,
    created TEXT NOT NULL,
    completed TEXT
);
