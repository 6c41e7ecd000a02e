-- Browser uploads: when the upload parameters of a template expire (ms since the epoch); a
-- template still waiting for its upload after that is abandoned.
ALTER TABLE templates ADD COLUMN upload_expires_ms BIGINT;
