//! Server-side filters: validated once when a client asks, then matched against each event's
//! keys without allocating.
use std::net::{IpAddr, SocketAddr};

use crate::proto;

/// What a filter looks at, extracted once per event (or per connection for ListConnections).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keys {
    pub kind: proto::EventKind,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The connection owner's pid, if known.
    pub pid: Option<u32>,
    pub netns: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("filter.ports[{index}]: {value} is not a TCP port (1-65535)")]
    Port { index: usize, value: u32 },
    #[error("filter.addresses[{index}]: {value:?} is not an IP address or CIDR ({why})")]
    Address {
        index: usize,
        value: String,
        why: String,
    },
    #[error("filter.netns[{index}]: {value} is not a network namespace inode (1-4294967295)")]
    Netns { index: usize, value: u64 },
    #[error("filter.kinds[{index}]: {value} is not an event kind")]
    Kind { index: usize, value: i32 },
    #[error("filter.pids[{index}]: 0 is not a process id")]
    Pid { index: usize },
}

/// An IP network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("bad address {addr:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("prefix {p:?} is not 0-{max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 filter also matches IPv4-mapped IPv6 addresses (dual-stack sockets).
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(net: &[u8], ip: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if net[..full] != ip[..full] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        net[full] & mask == ip[full] & mask
    }
}

/// A validated filter. Every non-empty part must match; within a part any value matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub ports: Vec<u16>,
    pub addresses: Vec<Cidr>,
    pub pids: Vec<u32>,
    pub netns: Vec<u32>,
    pub kinds: Vec<proto::EventKind>,
}

impl TryFrom<proto::Filter> for Filter {
    type Error = FilterError;

    fn try_from(f: proto::Filter) -> Result<Filter, FilterError> {
        let ports = f
            .ports
            .iter()
            .enumerate()
            .map(|(index, &value)| match u16::try_from(value) {
                Ok(port) if port != 0 => Ok(port),
                _ => Err(FilterError::Port { index, value }),
            })
            .collect::<Result<_, _>>()?;
        let addresses = f
            .addresses
            .iter()
            .enumerate()
            .map(|(index, value)| {
                Cidr::parse(value).map_err(|why| FilterError::Address {
                    index,
                    value: value.clone(),
                    why,
                })
            })
            .collect::<Result<_, _>>()?;
        let netns = f
            .netns
            .iter()
            .enumerate()
            .map(|(index, &value)| match u32::try_from(value) {
                Ok(inode) if inode != 0 => Ok(inode),
                _ => Err(FilterError::Netns { index, value }),
            })
            .collect::<Result<_, _>>()?;
        let kinds = f
            .kinds
            .iter()
            .enumerate()
            .map(|(index, &value)| match proto::EventKind::try_from(value) {
                Ok(kind) if kind != proto::EventKind::Unspecified => Ok(kind),
                _ => Err(FilterError::Kind { index, value }),
            })
            .collect::<Result<_, _>>()?;
        if let Some(index) = f.pids.iter().position(|&pid| pid == 0) {
            return Err(FilterError::Pid { index });
        }
        Ok(Filter {
            ports,
            addresses,
            pids: f.pids,
            netns,
            kinds,
        })
    }
}

impl Filter {
    pub fn matches(&self, keys: &Keys) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&keys.kind))
            && (self.netns.is_empty() || self.netns.contains(&keys.netns))
            && (self.ports.is_empty()
                || self
                    .ports
                    .iter()
                    .any(|&p| p == keys.local.port() || p == keys.remote.port()))
            && (self.addresses.is_empty()
                || self
                    .addresses
                    .iter()
                    .any(|c| c.contains(keys.local.ip()) || c.contains(keys.remote.ip())))
            && (self.pids.is_empty() || keys.pid.is_some_and(|pid| self.pids.contains(&pid)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys {
            kind: proto::EventKind::StateChange,
            local: "198.51.100.1:40000".parse().unwrap(),
            remote: "198.51.100.2:443".parse().unwrap(),
            pid: Some(77),
            netns: 4026532000,
        }
    }

    fn filter(f: proto::Filter) -> Filter {
        Filter::try_from(f).unwrap()
    }

    #[test]
    fn an_empty_filter_matches_everything() {
        assert!(filter(proto::Filter::default()).matches(&keys()));
    }

    #[test]
    fn each_part_matches_either_end_and_all_parts_must_match() {
        let by_port = filter(proto::Filter {
            ports: vec![443],
            ..Default::default()
        });
        assert!(by_port.matches(&keys()));
        let by_cidr = filter(proto::Filter {
            addresses: vec!["198.51.100.0/24".into()],
            ..Default::default()
        });
        assert!(by_cidr.matches(&keys()));
        let both = filter(proto::Filter {
            ports: vec![443],
            netns: vec![1],
            ..Default::default()
        });
        assert!(!both.matches(&keys()), "netns differs");
        let pid = filter(proto::Filter {
            pids: vec![77, 78],
            ..Default::default()
        });
        assert!(pid.matches(&keys()));
        assert!(
            !pid.matches(&Keys {
                pid: None,
                ..keys()
            }),
            "an unknown owner matches no pid"
        );
        let kind = filter(proto::Filter {
            kinds: vec![proto::EventKind::ConnectionClosed as i32],
            ..Default::default()
        });
        assert!(!kind.matches(&keys()));
    }

    #[test]
    fn cidrs_match_by_prefix_in_both_families() {
        let c = Cidr::parse("2001:db8::/33").unwrap();
        assert!(c.contains("2001:db8:7fff::1".parse().unwrap()));
        assert!(!c.contains("2001:db8:8000::1".parse().unwrap()));
        let v4 = Cidr::parse("198.51.100.0/25").unwrap();
        assert!(v4.contains("198.51.100.127".parse().unwrap()));
        assert!(!v4.contains("198.51.100.128".parse().unwrap()));
        assert!(
            v4.contains("::ffff:198.51.100.5".parse().unwrap()),
            "v4-mapped v6"
        );
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert_eq!(Cidr::parse("::1").unwrap().prefix, 128);
    }

    #[test]
    fn invalid_filters_name_the_bad_part() {
        let err = |f: proto::Filter| Filter::try_from(f).unwrap_err().to_string();
        assert_eq!(
            err(proto::Filter {
                ports: vec![80, 70000],
                ..Default::default()
            }),
            "filter.ports[1]: 70000 is not a TCP port (1-65535)"
        );
        assert!(
            err(proto::Filter {
                addresses: vec!["10.0.0.0/33".into()],
                ..Default::default()
            })
            .starts_with(
                "filter.addresses[0]: \"10.0.0.0/33\" is not an IP address or CIDR (prefix"
            )
        );
        assert!(
            err(proto::Filter {
                addresses: vec!["example.com".into()],
                ..Default::default()
            })
            .contains("bad address")
        );
        assert!(
            err(proto::Filter {
                kinds: vec![99],
                ..Default::default()
            })
            .contains("kinds[0]: 99")
        );
        assert!(
            err(proto::Filter {
                netns: vec![1 << 40],
                ..Default::default()
            })
            .contains("netns[0]")
        );
        assert!(
            err(proto::Filter {
                pids: vec![0],
                ..Default::default()
            })
            .contains("pids[0]")
        );
    }
}
