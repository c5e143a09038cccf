//! The CNI 1.0.0 result: interfaces, IP configurations, routes and DNS, as ADD prints it and as
//! the IPAM plugin returns it (without interfaces) and CHECK gets it back as `prevResult`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::conf::Dns;
use crate::error::{CniError, code};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The namespace path for interfaces inside the pod; absent for host-side ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR: `10.1.0.2/24`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// CIDR: `0.0.0.0/0`.
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// An address with its prefix length, parsed from CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = text.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl CniResult {
    /// Parses a result (the IPAM plugin's, or `prevResult`) and checks every address in it, so
    /// that nothing unparsable reaches `ip`.
    pub fn parse(value: serde_json::Value, whose: &str) -> Result<CniResult, CniError> {
        let bad = |details: String| {
            Err(CniError::new(code::DECODE_FAILURE, format!("{whose} is not a valid CNI result")).with_details(details))
        };
        let result: CniResult = match serde_json::from_value(value) {
            Ok(r) => r,
            Err(e) => return bad(e.to_string()),
        };
        for ip in &result.ips {
            if Cidr::parse(&ip.address).is_none() {
                return bad(format!("address {:?} is not CIDR", ip.address));
            }
            if let Some(gw) = &ip.gateway
                && gw.parse::<IpAddr>().is_err()
            {
                return bad(format!("gateway {gw:?} is not an IP address"));
            }
        }
        for route in &result.routes {
            if Cidr::parse(&route.dst).is_none() {
                return bad(format!("route destination {:?} is not CIDR", route.dst));
            }
            if let Some(gw) = &route.gw
                && gw.parse::<IpAddr>().is_err()
            {
                return bad(format!("route gateway {gw:?} is not an IP address"));
            }
        }
        Ok(result)
    }

    /// The gateway a route without one goes through: the first IP configuration's gateway of
    /// the route's address family (what the reference plugins do).
    pub fn gateway_for(&self, dst: &Cidr) -> Option<IpAddr> {
        self.ips
            .iter()
            .filter_map(|ip| ip.gateway.as_deref()?.parse::<IpAddr>().ok())
            .find(|gw| gw.is_ipv4() == dst.addr.is_ipv4())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_local_results_parse_and_bad_addresses_do_not() {
        let v = serde_json::json!({"cniVersion":"1.0.0","ips":[{"address":"10.99.0.2/24","gateway":"10.99.0.1"},
            {"address":"fd00::2/64","gateway":"fd00::1"}],"routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0"}],"dns":{}});
        let r = CniResult::parse(v, "x").unwrap();
        assert_eq!(r.gateway_for(&Cidr::parse("0.0.0.0/0").unwrap()), Some("10.99.0.1".parse().unwrap()));
        assert_eq!(r.gateway_for(&Cidr::parse("::/0").unwrap()), Some("fd00::1".parse().unwrap()));
        for bad in [
            serde_json::json!({"cniVersion":"1.0.0","ips":[{"address":"10.99.0.2"}]}),
            serde_json::json!({"cniVersion":"1.0.0","ips":[{"address":"10.99.0.2/33"}]}),
            serde_json::json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/8","gateway":"-x"}]}),
            serde_json::json!({"cniVersion":"1.0.0","routes":[{"dst":"0.0.0.0/0","gw":"1.2.3"}]}),
            serde_json::json!({"cniVersion":"1.0.0","routes":[{"dst":"default"}]}),
            serde_json::json!({"ips":[]}),
        ] {
            let e = CniResult::parse(bad.clone(), "x").unwrap_err();
            assert_eq!(e.code, code::DECODE_FAILURE, "{bad}");
        }
    }
}
