-- Every image store of a zone is served: a managed storage VM serves one store (NULL: the zone's
-- first store, as storage VMs started before this column did).
ALTER TABLE system_vms ADD COLUMN store_id TEXT;
