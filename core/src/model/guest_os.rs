//! The guest OS catalogue (`listOsTypes`, `listOsCategories`): CloudStack's categories (as of
//! 4.21) and the OS types templates and ISOs are registered with, under CloudStack's display names.
//!
//! Invariants: ids are stable across installs and releases (each entry carries its own number;
//! new entries get new numbers, none is reused), so scripts and Ansible playbooks may keep an id;
//! a name appears once; every OS type's category exists (unit tests).

/// A category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Category {
    /// Stable number (the id is derived from it).
    pub n: u32,
    /// Name.
    pub name: &'static str,
}

/// An OS type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsType {
    /// Stable number (the id is derived from it).
    pub n: u32,
    /// Display name (`description` and `name` in `listOsTypes`).
    pub name: &'static str,
    /// Its category's number.
    pub category: u32,
}

const fn c(n: u32, name: &'static str) -> Category {
    Category { n, name }
}

const fn os(n: u32, category: u32, name: &'static str) -> OsType {
    OsType { n, name, category }
}

/// Categories in CloudStack 4.21's order.
pub const CATEGORIES: &[Category] = &[
    c(10, "Ubuntu"),
    c(2, "Debian"),
    c(12, "Fedora"),
    c(1, "CentOS"),
    c(13, "Rocky Linux"),
    c(14, "AlmaLinux"),
    c(3, "Oracle"),
    c(4, "RedHat"),
    c(5, "SUSE"),
    c(6, "Windows"),
    c(7, "Other"),
];

/// The OS types.
pub const OS_TYPES: &[OsType] = &[
    os(1, 1, "CentOS 5.5 (64-bit)"),
    os(2, 1, "CentOS 6.0 (64-bit)"),
    os(3, 1, "CentOS 7"),
    os(4, 1, "CentOS 8"),
    os(5, 1, "CentOS Stream 9"),
    os(6, 1, "Other CentOS (64-bit)"),
    os(10, 13, "Rocky Linux 8"),
    os(11, 13, "Rocky Linux 9"),
    os(12, 14, "AlmaLinux 8"),
    os(13, 14, "AlmaLinux 9"),
    os(20, 2, "Debian GNU/Linux 6(64-bit)"),
    os(21, 2, "Debian GNU/Linux 7(64-bit)"),
    os(22, 2, "Debian GNU/Linux 8 (64-bit)"),
    os(23, 2, "Debian GNU/Linux 9 (64-bit)"),
    os(24, 2, "Debian GNU/Linux 10 (64-bit)"),
    os(25, 2, "Debian GNU/Linux 11 (64-bit)"),
    os(26, 2, "Debian GNU/Linux 12 (64-bit)"),
    os(27, 2, "Linux 3.x Kernel (64 bit)"),
    os(30, 3, "Oracle Enterprise Linux 6.x (64-bit)"),
    os(31, 3, "Oracle Linux 7"),
    os(32, 3, "Oracle Linux 8"),
    os(33, 3, "Oracle Linux 9"),
    os(40, 4, "Red Hat Enterprise Linux 6.0 (64-bit)"),
    os(41, 4, "Red Hat Enterprise Linux 7"),
    os(42, 4, "Red Hat Enterprise Linux 8"),
    os(43, 4, "Red Hat Enterprise Linux 9"),
    os(50, 12, "Fedora Linux (64 bit)"),
    os(51, 12, "Fedora Linux 38"),
    os(52, 12, "Fedora Linux 39"),
    os(53, 12, "Fedora Linux 40"),
    os(60, 5, "SUSE Linux Enterprise Server 11 SP3 (64-bit)"),
    os(61, 5, "SUSE Linux Enterprise Server 12 (64-bit)"),
    os(62, 5, "SUSE Linux Enterprise Server 15 (64-bit)"),
    os(63, 5, "Other SUSE Linux(64-bit)"),
    os(64, 5, "openSUSE Leap 15"),
    os(70, 10, "Ubuntu 14.04 (64-bit)"),
    os(71, 10, "Ubuntu 16.04 (64-bit)"),
    os(72, 10, "Ubuntu 18.04 LTS"),
    os(73, 10, "Ubuntu 20.04 LTS"),
    os(74, 10, "Ubuntu 22.04 LTS"),
    os(75, 10, "Ubuntu 24.04 LTS"),
    os(76, 10, "Other Ubuntu (64-bit)"),
    os(80, 6, "Windows 7 (64-bit)"),
    os(81, 6, "Windows 8.1 (64-bit)"),
    os(82, 6, "Windows 10 (64-bit)"),
    os(83, 6, "Windows 11 (64-bit)"),
    os(84, 6, "Windows Server 2008 R2 (64-bit)"),
    os(85, 6, "Windows Server 2012 R2 (64-bit)"),
    os(86, 6, "Windows Server 2016 (64-bit)"),
    os(87, 6, "Windows Server 2019 (64-bit)"),
    os(88, 6, "Windows Server 2022 (64-bit)"),
    os(89, 6, "Windows Server 2025 (64-bit)"),
    os(90, 6, "Windows PV"),
    os(91, 6, "DOS"),
    os(100, 7, "Other (64-bit)"),
    os(101, 7, "Other (32-bit)"),
    os(102, 7, "Other Linux (64-bit)"),
    os(103, 7, "Other 2.6x Linux (64-bit)"),
    os(104, 7, "Other PV (64-bit)"),
    os(105, 7, "None"),
    os(106, 7, "OVF Configured OS"),
    os(107, 7, "FreeBSD (64-bit)"),
    os(108, 7, "FreeBSD 13 (64-bit)"),
    os(109, 7, "OpenBSD 6.x (64-bit)"),
    os(110, 7, "pfSense 2.4"),
    os(111, 7, "Alpine Linux (64-bit)"),
    os(112, 7, "Arch Linux (64-bit)"),
    os(113, 7, "macOS 13 (64-bit)"),
    os(114, 7, "macOS 14 (64-bit)"),
];

impl Category {
    /// The stable id.
    pub fn id(&self) -> String {
        format!("00000000-0000-4000-8300-{:012x}", self.n)
    }
}

impl OsType {
    /// The stable id.
    pub fn id(&self) -> String {
        format!("00000000-0000-4000-8400-{:012x}", self.n)
    }

    /// Its category.
    pub fn category(&self) -> Option<&'static Category> {
        CATEGORIES.iter().find(|c| c.n == self.category)
    }
}

/// The OS type with this id.
pub fn by_id(id: &str) -> Option<&'static OsType> {
    OS_TYPES.iter().find(|o| o.id().eq_ignore_ascii_case(id))
}

/// The category with this id.
pub fn category_by_id(id: &str) -> Option<&'static Category> {
    CATEGORIES.iter().find(|c| c.id().eq_ignore_ascii_case(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_and_consistent() {
        let mut ns: Vec<u32> = OS_TYPES.iter().map(|o| o.n).collect();
        ns.sort_unstable();
        ns.dedup();
        assert_eq!(ns.len(), OS_TYPES.len(), "duplicate OS type number");
        let mut names: Vec<&str> = OS_TYPES.iter().map(|o| o.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), OS_TYPES.len(), "duplicate OS type name");
        for o in OS_TYPES {
            assert!(o.category().is_some(), "{}", o.name);
            assert_eq!(by_id(&o.id()), Some(o));
        }
        for c in CATEGORIES {
            assert_eq!(category_by_id(&c.id()), Some(c));
        }
        // Ids are part of the API: a known one stays.
        assert_eq!(
            by_id("00000000-0000-4000-8400-000000000001").unwrap().name,
            "CentOS 5.5 (64-bit)"
        );
    }
}
