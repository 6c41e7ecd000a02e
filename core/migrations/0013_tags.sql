-- Resource tags (createTags/deleteTags/listTags): one value per key on a resource.
CREATE TABLE resource_tags (
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    tag_key TEXT NOT NULL,
    tag_value TEXT NOT NULL,
    account_id TEXT NOT NULL,
    customer TEXT,
    created TEXT NOT NULL,
    PRIMARY KEY (resource_type, resource_id, tag_key)
);
CREATE INDEX resource_tags_resource ON resource_tags (resource_id);
