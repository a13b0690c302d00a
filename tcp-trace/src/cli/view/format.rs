//! The one place the views format what they share: durations, endpoints, owners, proto enum
//! names without their prefix, and the cells of a peer's row.
use std::fmt::Write as _;

use crate::proto;

pub fn write_endpoint(out: &mut String, e: Option<&proto::Endpoint>) {
    match e {
        Some(e) if e.address.contains(':') => {
            let _ = write!(out, "[{}]:{}", e.address, e.port);
        }
        Some(e) => {
            let _ = write!(out, "{}:{}", e.address, e.port);
        }
        None => out.push('?'),
    }
}

#[cfg(test)]
pub fn endpoint(e: Option<&proto::Endpoint>) -> String {
    let mut out = String::new();
    write_endpoint(&mut out, e);
    out
}

/// Local and remote, with the arrow pointing from client to server.
pub fn write_tuple(out: &mut String, c: &proto::Connection) {
    write_endpoint(out, c.local.as_ref());
    let arrow = match proto::Direction::try_from(c.direction) {
        Ok(proto::Direction::Active) => " -> ",
        Ok(proto::Direction::Passive) => " <- ",
        Ok(proto::Direction::Listen) => {
            out.push_str(" (listening)");
            return;
        }
        _ => " -- ",
    };
    out.push_str(arrow);
    write_endpoint(out, c.remote.as_ref());
}

pub fn tuple(c: &proto::Connection) -> String {
    let mut out = String::new();
    write_tuple(&mut out, c);
    out
}

pub fn direction_name(value: i32) -> &'static str {
    match proto::Direction::try_from(value) {
        Ok(proto::Direction::Active) => "active",
        Ok(proto::Direction::Passive) => "passive",
        Ok(proto::Direction::Listen) => "listen",
        _ => "unknown",
    }
}

pub fn write_owner(out: &mut String, p: Option<&proto::Process>) {
    match p {
        Some(p) if p.attribution != proto::Attribution::None as i32 && p.pid != 0 => {
            let _ = write!(out, "{}/{}", p.pid, p.comm);
        }
        _ => out.push('-'),
    }
}

pub fn owner(p: Option<&proto::Process>) -> String {
    let mut out = String::new();
    write_owner(&mut out, p);
    out
}

/// A duration as people read one: `850us`, `2.5ms`, `1.02s`; `?` where there is none.
pub fn write_duration(out: &mut String, d: Option<&prost_types::Duration>) {
    let Some(d) = d else {
        out.push('?');
        return;
    };
    let secs = d.seconds as f64 + f64::from(d.nanos) / 1e9;
    let _ = match secs {
        s if s < 1e-3 => write!(out, "{:.0}us", s * 1e6),
        s if s < 1.0 => write!(out, "{:.1}ms", s * 1e3),
        s => write!(out, "{s:.2}s"),
    };
}

pub fn duration(d: Option<&prost_types::Duration>) -> String {
    let mut out = String::new();
    write_duration(&mut out, d);
    out
}

/// A proto enum whose value names start with the enum's own name (`CLOSE_CAUSE_REFUSED`), as the
/// proto style asks; the views show the names without it.
pub trait ProtoEnum: TryFrom<i32> {
    /// What every value's name starts with.
    const PREFIX: &'static str;
    /// The value's whole name, as the proto spells it.
    fn proto_name(&self) -> &'static str;
}

macro_rules! proto_enums {
    ($($enum:ty => $prefix:literal),* $(,)?) => {$(
        impl ProtoEnum for $enum {
            const PREFIX: &'static str = $prefix;
            fn proto_name(&self) -> &'static str {
                self.as_str_name()
            }
        }
    )*};
}

proto_enums!(
    proto::TcpState => "TCP_STATE_",
    proto::CloseCause => "CLOSE_CAUSE_",
    proto::EventKind => "EVENT_KIND_",
);

/// A proto enum value's name without its prefix (`SYN_SENT`, `RESET_RECEIVED`); None for a value
/// this build does not know.
pub fn enum_name<E: ProtoEnum>(value: i32) -> Option<&'static str> {
    E::try_from(value)
        .ok()
        .map(|e| e.proto_name().trim_start_matches(E::PREFIX))
}

/// A TCP state as the kernel names it: `SYN_SENT`.
pub fn state_name(value: i32) -> &'static str {
    enum_name::<proto::TcpState>(value).unwrap_or("?")
}

/// A name from [`enum_name`] in lower case with spaces, as a sentence says it: `reset received`.
pub fn write_words(out: &mut String, name: Option<&str>) {
    match name {
        Some(name) => out.extend(name.chars().map(|c| {
            if c == '_' {
                ' '
            } else {
                c.to_ascii_lowercase()
            }
        })),
        None => out.push('?'),
    }
}

/// A peer as a user reads it: `-> ADDRESS:PORT` for a service this host connects to,
/// `<- ADDRESS on :PORT` for clients of a local port.
pub fn peer_label(p: &proto::PeerStats) -> String {
    let address = if p.address.contains(':') {
        format!("[{}]", p.address)
    } else {
        p.address.clone()
    };
    if p.direction == proto::Direction::Active as i32 {
        format!("-> {address}:{}", p.port)
    } else {
        format!("<- {address} on :{}", p.port)
    }
}

/// The cells of a peer's row, formatted once for both peer tables (`stats` and `top`), which
/// lay them out in columns of their own.
pub struct PeerCells {
    /// [`peer_label`].
    pub label: String,
    /// Handshake latency percentiles, `-` before any handshake.
    pub handshake_p50: String,
    pub handshake_p99: String,
    /// The short-lived share of closed connections in percent, `-` before any closed.
    pub short_lived: String,
    /// Failed connections, all causes.
    pub failed: u64,
    /// Failed connections by cause: `3 refused, 1 connect timeout`.
    pub failures: String,
}

impl PeerCells {
    pub fn new(p: &proto::PeerStats) -> PeerCells {
        let latency =
            |d: Option<&prost_types::Duration>| d.map_or_else(|| "-".into(), |d| duration(Some(d)));
        let short_lived = if p.closed > 0 {
            format!("{:.0}", 100.0 * p.short_lived as f64 / p.closed as f64)
        } else {
            "-".into()
        };
        let mut failures = String::new();
        for (i, f) in p.failures.iter().enumerate() {
            if i > 0 {
                failures.push_str(", ");
            }
            let _ = write!(failures, "{} ", f.count);
            write_words(&mut failures, enum_name::<proto::CloseCause>(f.cause));
        }
        PeerCells {
            label: peer_label(p),
            handshake_p50: latency(p.handshake_p50.as_ref()),
            handshake_p99: latency(p.handshake_p99.as_ref()),
            short_lived,
            failed: p.failures.iter().map(|f| f.count).sum(),
            failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        assert_eq!(
            endpoint(Some(&proto::Endpoint {
                address: "::1".into(),
                port: 80
            })),
            "[::1]:80"
        );
    }

    #[test]
    fn every_name_of_a_shown_enum_starts_with_the_prefix_the_views_strip() {
        fn all<E: ProtoEnum>() -> usize {
            (0..256)
                .filter_map(|v| E::try_from(v).ok())
                .inspect(|e| assert!(e.proto_name().starts_with(E::PREFIX), "{}", e.proto_name()))
                .count()
        }
        assert!(all::<proto::TcpState>() > 10);
        assert!(all::<proto::CloseCause>() > 5);
        assert!(all::<proto::EventKind>() > 5);
        assert_eq!(state_name(proto::TcpState::SynSent as i32), "SYN_SENT");
        assert_eq!(state_name(1000), "?");
    }

    #[test]
    fn a_peers_cells_name_failures_in_words_and_show_dashes_before_any_data() {
        let p = proto::PeerStats {
            direction: proto::Direction::Active as i32,
            address: "2001:db8::7".into(),
            port: 443,
            failures: vec![
                proto::CauseCount {
                    cause: proto::CloseCause::ConnectTimeout as i32,
                    count: 2,
                },
                proto::CauseCount {
                    cause: proto::CloseCause::Refused as i32,
                    count: 1,
                },
            ],
            ..Default::default()
        };
        let cells = PeerCells::new(&p);
        assert_eq!(cells.label, "-> [2001:db8::7]:443");
        assert_eq!(cells.failures, "2 connect timeout, 1 refused");
        assert_eq!(cells.failed, 3);
        assert_eq!(cells.handshake_p50, "-");
        assert_eq!(cells.short_lived, "-");
    }
}
