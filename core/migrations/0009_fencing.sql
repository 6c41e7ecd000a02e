-- Fencing of installs: raised each time a download is sent to a storage VM connection and when
-- the install is deleted; a storage VM running an older epoch may neither write nor report it.
ALTER TABLE templates ADD COLUMN dispatch_epoch BIGINT NOT NULL DEFAULT 0;
