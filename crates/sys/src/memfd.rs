//! Memory files and their seals. A vhost-user frontend hands vmq guest memory as file
//! descriptors; a file that can shrink under vmq's mapping turns vmq's next access into a
//! SIGBUS that kills every VM's network. A memfd sealed with `F_SEAL_SHRINK` cannot shrink
//! (`ftruncate` below its size fails with EPERM), so checking the seal makes that impossible.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};

use crate::cvt;

/// `F_SEAL_*` bits (fcntl(2)).
pub const SEAL_SEAL: u32 = libc::F_SEAL_SEAL as u32;
pub const SEAL_SHRINK: u32 = libc::F_SEAL_SHRINK as u32;
pub const SEAL_GROW: u32 = libc::F_SEAL_GROW as u32;
pub const SEAL_WRITE: u32 = libc::F_SEAL_WRITE as u32;

/// The seals on `file`; None if the file cannot carry seals at all (not shmem or hugetlbfs:
/// a file on a disk file system, a pipe). Files on tmpfs or hugetlbfs that were not created by
/// `memfd_create(MFD_ALLOW_SEALING)` report [`SEAL_SEAL`] only.
pub fn seals(file: &impl AsFd) -> io::Result<Option<u32>> {
    let fd = file.as_fd().as_raw_fd();
    // SAFETY: F_GET_SEALS takes no argument and only reads the file's seal set; `fd` is a valid
    // descriptor borrowed for the duration of the call.
    match cvt(unsafe { libc::fcntl(fd, libc::F_GET_SEALS) }) {
        Ok(seals) => Ok(Some(seals as u32)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Adds `seals` to a memfd created with sealing allowed.
pub fn add_seals(file: &impl AsFd, seals: u32) -> io::Result<()> {
    let fd = file.as_fd().as_raw_fd();
    // SAFETY: F_ADD_SEALS takes an int of seal bits and changes only the file's seal set; `fd`
    // is a valid descriptor borrowed for the duration of the call.
    cvt(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals as libc::c_int) })?;
    Ok(())
}

/// A new memfd of `size` bytes that allows sealing (close-on-exec), with `seals` applied, as
/// QEMU's `memory-backend-memfd` makes guest memory (it seals GROW | SHRINK | SEAL by default).
pub fn create(name: &str, size: u64, seals: u32) -> io::Result<File> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the flags are
    // valid memfd_create flags.
    let fd = cvt(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) })?;
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    if seals != 0 {
        add_seals(&file, seals)?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shrink_sealed_memfd_cannot_be_truncated() {
        let sealed = create("vmq-test", 1 << 20, SEAL_SHRINK | SEAL_GROW | SEAL_SEAL).unwrap();
        assert_eq!(seals(&sealed).unwrap(), Some(SEAL_SHRINK | SEAL_GROW | SEAL_SEAL));
        let err = sealed.set_len(4096).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        assert_eq!(sealed.metadata().unwrap().len(), 1 << 20);
        let open = create("vmq-test", 1 << 20, 0).unwrap();
        assert_eq!(seals(&open).unwrap(), Some(0));
        open.set_len(4096).unwrap();
        assert!(add_seals(&sealed, SEAL_WRITE).is_err(), "F_SEAL_SEAL forbids more seals");
    }

    #[test]
    fn files_that_cannot_be_sealed_say_so() {
        // /proc files cannot carry seals; a pipe neither.
        assert_eq!(seals(&File::open("/proc/self/status").unwrap()).unwrap(), None);
    }
}
