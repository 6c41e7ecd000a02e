-- A zone's system VM driver: NULL = core's driver; 'none' = core deploys nothing in the zone;
-- 'libvirt:URI' = libvirt domains on that host. system_vms.driver holds the same spec.
ALTER TABLE zones ADD COLUMN systemvm_driver TEXT;
