//! Exit codes that mean something to scripts, shared by every subcommand.

use vmq_control::ClientError;

/// Bad usage or invalid configuration.
pub const CONFIG: u8 = 2;
/// A runtime failure (a port could not be created, the data path failed); for `vmq ctl`:
/// vmq refused or failed the request.
pub const RUNTIME: u8 = 1;
/// `vmq ctl`/`vmq top`: vmq cannot be reached (not running, wrong socket, no answer).
pub const UNREACHABLE: u8 = 3;

/// The exit code for a failed exchange with vmq over its control socket.
pub fn for_client_error(e: &ClientError) -> u8 {
    if e.is_unreachable() { UNREACHABLE } else { RUNTIME }
}
