//! Interface names as the kernel accepts them (`dev_valid_name`): 1 to 15 bytes, no `/`, `:`,
//! whitespace or NUL, not `.` or `..`. Checked before any ioctl so the error says why.

/// Why an interface name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?}: interface name {reason}")]
pub struct IfNameError {
    pub name: String,
    pub reason: &'static str,
}

/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Checks `name` against the kernel's rule: the one check for configuration and ioctls alike.
pub fn check(name: &str) -> Result<(), IfNameError> {
    let bad = |reason| Err(IfNameError { name: name.to_string(), reason });
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_IFNAME_LEN {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("may not be \".\" or \"..\"");
    }
    if name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace()) {
        return bad("contains '/', ':', NUL or whitespace");
    }
    Ok(())
}

/// Checks `name` and returns it as the NUL-padded array `struct ifreq` carries.
pub fn to_ifr_name(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], IfNameError> {
    check(name)?;
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = b as libc::c_char;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        assert!(to_ifr_name("vqs-tap0").is_ok());
        assert!(to_ifr_name("a23456789012345").is_ok());
        assert_eq!(to_ifr_name("a234567890123456").unwrap_err().reason, "longer than 15 bytes");
        assert_eq!(to_ifr_name("").unwrap_err().reason, "is empty");
        assert!(to_ifr_name("a/b").is_err());
        assert!(to_ifr_name("a b").is_err());
        assert!(to_ifr_name("..").is_err());
        let e = to_ifr_name("vmq-vm1-much-too-long").unwrap_err();
        assert_eq!(e.to_string(), "\"vmq-vm1-much-too-long\": interface name longer than 15 bytes");
    }
}
