-- Zone-scoped values of the fleet settings (consoleproxy.*, secstorage.*): a zone's value wins over
-- the global one in `configurations`.
CREATE TABLE zone_configurations (
    zone_id TEXT NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    updated TEXT NOT NULL,
    PRIMARY KEY (zone_id, name)
);
