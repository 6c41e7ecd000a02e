-- A console target may name its VM on a hypervisor host core knows (libvirt domain name); its VNC
-- endpoint is then read from the hypervisor when a link is made (host/port are unused).
ALTER TABLE console_targets ADD COLUMN hypervisor_ref TEXT;
