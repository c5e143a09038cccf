//! CNI errors as the spec defines them: a numeric code, a short message and details, printed as
//! JSON on stdout with a non-zero exit status. Codes 1-99 are the spec's; 100 and up are
//! vmq-cni's own.

use serde::{Deserialize, Serialize};

/// The spec's well-known error codes, and vmq-cni's own (100 and up).
pub mod code {
    /// The configuration's `cniVersion` is not one this plugin supports.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// The container's namespace does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// A `CNI_*` environment variable is missing or invalid.
    pub const INVALID_ENV: u32 = 4;
    /// Running a program (the IPAM plugin, `ip`) or entering the namespace failed.
    pub const IO_FAILURE: u32 = 5;
    /// The network configuration on stdin is not JSON of the expected shape.
    pub const DECODE_FAILURE: u32 = 6;
    /// The network configuration has a wrong value (vmq's refusals of a value included).
    pub const INVALID_CONFIG: u32 = 7;
    /// vmq cannot be reached now (not running, not answering, busy): the runtime should retry.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// vmq refused or failed the request for another reason.
    pub const VMQ_REFUSED: u32 = 100;
    /// CHECK: the pod's networking is not what ADD set up.
    pub const CHECK_FAILED: u32 = 101;
    /// The IPAM plugin failed without a CNI error on stdout.
    pub const IPAM_FAILED: u32 = 102;
}

/// One CNI error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}{}{details} (code {code})", if details.is_empty() { "" } else { ": " })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl ToString) -> CniError {
        self.details = details.to_string();
        self
    }

    /// The error as the spec prints it (`cniVersion`, `code`, `msg`, `details`).
    pub fn to_json(&self, cni_version: &str) -> String {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_as_the_spec_says() {
        let e = CniError::new(code::TRY_AGAIN_LATER, "vmq is unreachable").with_details("socket /x");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "vmq is unreachable");
        assert_eq!(v["details"], "socket /x");
        assert_eq!(e.to_string(), "vmq is unreachable: socket /x (code 11)");
    }
}
