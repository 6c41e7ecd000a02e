-- The user directory: domains (a tree under ROOT), accounts in domains with one of the
-- predefined roles (ids fixed in core/src/roles.rs), several users per account, and the
-- failed-login counter of each user. Account and user names stay unique cloud-wide.
CREATE TABLE domains (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    parent_id TEXT REFERENCES domains(id),
    path TEXT NOT NULL UNIQUE,
    level BIGINT NOT NULL,
    network_domain TEXT,
    state TEXT NOT NULL,
    created TEXT NOT NULL
);
INSERT INTO domains (id, name, parent_id, path, level, network_domain, state, created)
VALUES ('00000000-0000-4000-8000-000000000001', 'ROOT', NULL, '/', 0, NULL, 'Active', '1970-01-01T00:00:00+0000');

ALTER TABLE accounts ADD COLUMN domain_id TEXT NOT NULL DEFAULT '00000000-0000-4000-8000-000000000001';
ALTER TABLE accounts ADD COLUMN role_id TEXT NOT NULL DEFAULT '00000000-0000-4000-8100-000000000004';
UPDATE accounts SET role_id = '00000000-0000-4000-8100-000000000001' WHERE role_type = 'Admin';
UPDATE accounts SET role_id = '00000000-0000-4000-8100-000000000006' WHERE role_type = 'ReadOnly';
ALTER TABLE accounts ADD COLUMN network_domain TEXT;

ALTER TABLE users ADD COLUMN failed_logins BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN timezone TEXT;
ALTER TABLE users ADD COLUMN is_default BIGINT NOT NULL DEFAULT 0;
UPDATE users SET is_default = 1 WHERE account_id IN (SELECT id FROM accounts WHERE is_system = 1);

-- Pre-shared-key logins seen within the tolerance window: a signature is accepted once.
CREATE TABLE sso_logins (
    signature TEXT PRIMARY KEY,
    seen_ms BIGINT NOT NULL
);
