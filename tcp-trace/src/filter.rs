//! Server-side filters: validated once when a client asks, then matched against each event's
//! keys without allocating.
use std::{fmt, net::IpAddr};

pub use crate::event::Keys;
use crate::{
    event::EventKind,
    model::{Direction, TcpState},
    proto,
};

/// Most values a filter may hold in all its parts together: matching costs a scan of each part
/// for every event, so a client must not make the producer slow for everyone.
pub const MAX_FILTER_VALUES: usize = 256;

/// Longest task name the kernel keeps (TASK_COMM_LEN - 1).
pub const MAX_COMM: usize = 15;

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
    #[error(
        "filter.comms[{index}]: {value:?} can never match: a task name is 1-{MAX_COMM} bytes \
         (the kernel truncates longer names)"
    )]
    Comm { index: usize, value: String },
    #[error("filter.directions[{index}]: {value} is not a direction")]
    Direction { index: usize, value: i32 },
    #[error("filter.states[{index}]: {value} is not a TCP state")]
    State { index: usize, value: i32 },
    #[error(
        "filter has {values} values, more than the {limit} a filter may have: match ranges with \
         CIDRs, or split it over several subscriptions"
    )]
    TooComplex { values: usize, limit: usize },
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
            .map_err(|_| format!("bad address {:?}", shown(addr)))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("prefix {:?} is not 0-{max}", shown(p))),
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

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == max {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
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
    pub kinds: Vec<EventKind>,
    /// NUL padded, as [`Keys::comm`].
    pub comms: Vec<[u8; 16]>,
    pub directions: Vec<Direction>,
    pub states: Vec<TcpState>,
}

/// A client's text in an error message, cut short: the request may be large.
fn shown(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

/// Validates each value of one part, naming the first bad one.
fn each<T, U>(
    values: &[T],
    check: impl Fn(usize, &T) -> Result<U, FilterError>,
) -> Result<Vec<U>, FilterError> {
    values
        .iter()
        .enumerate()
        .map(|(index, value)| check(index, value))
        .collect()
}

impl TryFrom<proto::Filter> for Filter {
    type Error = FilterError;

    fn try_from(f: proto::Filter) -> Result<Filter, FilterError> {
        let values = f.ports.len()
            + f.addresses.len()
            + f.pids.len()
            + f.netns.len()
            + f.kinds.len()
            + f.comms.len()
            + f.directions.len()
            + f.states.len();
        if values > MAX_FILTER_VALUES {
            return Err(FilterError::TooComplex {
                values,
                limit: MAX_FILTER_VALUES,
            });
        }
        let ports = each(&f.ports, |index, &value| match u16::try_from(value) {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(FilterError::Port { index, value }),
        })?;
        let addresses = each(&f.addresses, |index, value| {
            Cidr::parse(value).map_err(|why| FilterError::Address {
                index,
                value: shown(value),
                why,
            })
        })?;
        let netns = each(&f.netns, |index, &value| match u32::try_from(value) {
            Ok(inode) if inode != 0 => Ok(inode),
            _ => Err(FilterError::Netns { index, value }),
        })?;
        let kinds = each(&f.kinds, |index, &value| {
            EventKind::ALL
                .into_iter()
                .find(|&kind| kind as i32 == value)
                .ok_or(FilterError::Kind { index, value })
        })?;
        if let Some(index) = f.pids.iter().position(|&pid| pid == 0) {
            return Err(FilterError::Pid { index });
        }
        let comms = each(&f.comms, |index, value| {
            let bytes = value.as_bytes();
            if bytes.is_empty() || bytes.len() > MAX_COMM || bytes.contains(&0) {
                return Err(FilterError::Comm {
                    index,
                    value: shown(value),
                });
            }
            let mut comm = [0u8; 16];
            comm[..bytes.len()].copy_from_slice(bytes);
            Ok(comm)
        })?;
        let directions = each(
            &f.directions,
            |index, &value| match proto::Direction::try_from(value) {
                Ok(proto::Direction::Active) => Ok(Direction::Active),
                Ok(proto::Direction::Passive) => Ok(Direction::Passive),
                Ok(proto::Direction::Listen) => Ok(Direction::Listen),
                Ok(proto::Direction::Unknown) => Ok(Direction::Unknown),
                Ok(proto::Direction::Unspecified) | Err(_) => {
                    Err(FilterError::Direction { index, value })
                }
            },
        )?;
        let states = each(&f.states, |index, &value| {
            u8::try_from(value)
                .ok()
                .and_then(TcpState::from_kernel)
                .ok_or(FilterError::State { index, value })
        })?;
        Ok(Filter {
            ports,
            addresses,
            pids: f.pids,
            netns,
            kinds,
            comms,
            directions,
            states,
        })
    }
}

impl Filter {
    /// Whether events of kind state change pass the kinds part (the rest may still not).
    pub fn asks_for_state_changes(&self) -> bool {
        self.passes_kind(EventKind::StateChange)
    }

    pub fn matches(&self, keys: &Keys) -> bool {
        self.passes_kind(keys.kind) && self.matches_connection(keys)
    }

    /// The kinds part: no kinds asked for means every kind.
    fn passes_kind(&self, kind: EventKind) -> bool {
        self.kinds.is_empty() || self.kinds.contains(&kind)
    }

    /// Every part but the kind: a connection listed is not an event.
    pub fn matches_connection(&self, keys: &Keys) -> bool {
        (self.netns.is_empty() || self.netns.contains(&keys.netns))
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
            && (self.comms.is_empty() || (keys.comm[0] != 0 && self.comms.contains(&keys.comm)))
            && (self.directions.is_empty() || self.directions.contains(&keys.direction))
            && (self.states.is_empty() || keys.state.is_some_and(|s| self.states.contains(&s)))
    }

    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }
}

/// The filter in the CLI's words, for GetStats: `netns=4026532000 port=80,443`, or `all`.
impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn part<T>(
            f: &mut fmt::Formatter<'_>,
            first: &mut bool,
            name: &str,
            values: &[T],
            show: impl Fn(&T) -> String,
        ) -> fmt::Result {
            if values.is_empty() {
                return Ok(());
            }
            let shown: Vec<String> = values.iter().map(show).collect();
            let sep = if *first { "" } else { " " };
            *first = false;
            write!(f, "{sep}{name}={}", shown.join(","))
        }
        if self.is_empty() {
            return f.write_str("all");
        }
        let first = &mut true;
        part(f, first, "netns", &self.netns, u32::to_string)?;
        part(f, first, "port", &self.ports, u16::to_string)?;
        part(f, first, "addr", &self.addresses, Cidr::to_string)?;
        part(f, first, "pid", &self.pids, u32::to_string)?;
        part(f, first, "comm", &self.comms, |c| {
            let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
            String::from_utf8_lossy(&c[..end]).into_owned()
        })?;
        part(f, first, "direction", &self.directions, |d| {
            d.name().to_owned()
        })?;
        part(f, first, "state", &self.states, |s| s.name().to_owned())?;
        part(f, first, "kind", &self.kinds, |k| k.name().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys {
            kind: EventKind::StateChange,
            local: "198.51.100.1:40000".parse().unwrap(),
            remote: "198.51.100.2:443".parse().unwrap(),
            pid: Some(77),
            netns: 4026532000,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            direction: Direction::Active,
            state: Some(TcpState::Established),
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
    #[test]
    fn comm_direction_and_state_match_the_connection() {
        let f = filter(proto::Filter {
            comms: vec!["curl".into(), "wget".into()],
            directions: vec![proto::Direction::Active as i32],
            states: vec![
                proto::TcpState::Established as i32,
                proto::TcpState::Close as i32,
            ],
            ..Default::default()
        });
        assert!(f.matches(&keys()));
        let curly = *b"curly\0\0\0\0\0\0\0\0\0\0\0";
        assert!(
            !f.matches(&Keys {
                comm: curly,
                ..keys()
            }),
            "exact names only"
        );
        assert!(
            !f.matches(&Keys {
                comm: [0; 16],
                ..keys()
            }),
            "an unknown owner matches no comm"
        );
        assert!(!f.matches(&Keys {
            direction: Direction::Passive,
            ..keys()
        }));
        assert!(!f.matches(&Keys {
            state: Some(TcpState::SynSent),
            ..keys()
        }));
    }

    #[test]
    fn a_filter_may_hold_at_most_256_values_in_all() {
        let at_limit = proto::Filter {
            ports: (1..=200).collect(),
            pids: (1..=56).collect(),
            ..Default::default()
        };
        assert!(Filter::try_from(at_limit.clone()).is_ok());
        let over = proto::Filter {
            comms: vec!["x".into()],
            ..at_limit
        };
        assert_eq!(
            Filter::try_from(over).unwrap_err(),
            FilterError::TooComplex {
                values: 257,
                limit: 256
            }
        );
    }

    #[test]
    fn new_parts_are_validated_and_long_values_cut_short_in_messages() {
        let err = |f: proto::Filter| Filter::try_from(f).unwrap_err().to_string();
        assert!(
            err(proto::Filter {
                comms: vec!["a-very-long-task-name".into()],
                ..Default::default()
            })
            .starts_with("filter.comms[0]: \"a-very-long-task-name\" can never match")
        );
        assert!(
            err(proto::Filter {
                comms: vec![String::new()],
                ..Default::default()
            })
            .starts_with("filter.comms[0]")
        );
        assert!(
            err(proto::Filter {
                directions: vec![0],
                ..Default::default()
            })
            .starts_with("filter.directions[0]: 0")
        );
        assert!(
            err(proto::Filter {
                states: vec![1, 99],
                ..Default::default()
            })
            .starts_with("filter.states[1]: 99")
        );
        let huge = err(proto::Filter {
            addresses: vec!["x".repeat(10_000)],
            ..Default::default()
        });
        assert!(huge.len() < 300, "{huge}");
    }

    #[test]
    fn a_filter_reads_back_in_the_clis_words() {
        assert_eq!(Filter::default().to_string(), "all");
        let f = filter(proto::Filter {
            ports: vec![80, 443],
            addresses: vec!["10.0.0.0/8".into(), "::1".into()],
            netns: vec![7],
            comms: vec!["nginx".into()],
            directions: vec![proto::Direction::Passive as i32],
            states: vec![proto::TcpState::SynRecv as i32],
            kinds: vec![proto::EventKind::ConnectionClosed as i32],
            ..Default::default()
        });
        assert_eq!(
            f.to_string(),
            "netns=7 port=80,443 addr=10.0.0.0/8,::1 comm=nginx direction=passive \
             state=SYN_RECV kind=connection-closed"
        );
    }
}
