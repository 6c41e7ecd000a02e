-- Volumes uploaded from browsers (getUploadParamsForVolume): they live on an image store until
-- used, with CloudStack's volume states (NotUploaded, UploadInProgress, Uploaded, UploadError,
-- UploadAbandoned; every other volume is Ready).
ALTER TABLE volumes ADD COLUMN state TEXT NOT NULL DEFAULT 'Ready';
ALTER TABLE volumes ADD COLUMN store_id TEXT REFERENCES image_stores(id);
ALTER TABLE volumes ADD COLUMN status TEXT;
ALTER TABLE volumes ADD COLUMN checksum TEXT;
ALTER TABLE volumes ADD COLUMN sha256 TEXT;
ALTER TABLE volumes ADD COLUMN agent_id TEXT;
ALTER TABLE volumes ADD COLUMN upload_expires_ms BIGINT;
ALTER TABLE volumes ADD COLUMN dispatch_epoch BIGINT NOT NULL DEFAULT 0;
