-- updateZone's fields beyond createZone's: IPv6 DNS servers and the guest CIDR.
ALTER TABLE zones ADD COLUMN ip6_dns1 TEXT;
ALTER TABLE zones ADD COLUMN ip6_dns2 TEXT;
ALTER TABLE zones ADD COLUMN guest_cidr TEXT;
-- Template and ISO properties updateTemplate/updateIso set and Ansible compares.
ALTER TABLE templates ADD COLUMN password_enabled BIGINT NOT NULL DEFAULT 0;
ALTER TABLE templates ADD COLUMN sshkey_enabled BIGINT NOT NULL DEFAULT 0;
ALTER TABLE templates ADD COLUMN dynamically_scalable BIGINT NOT NULL DEFAULT 0;
ALTER TABLE templates ADD COLUMN requires_hvm BIGINT NOT NULL DEFAULT 1;
-- Templates and ISOs shared with other accounts (updateTemplatePermissions accounts=).
CREATE TABLE template_shares (
    template_id TEXT NOT NULL REFERENCES templates(id) ON DELETE CASCADE,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    PRIMARY KEY (template_id, account_id)
);
