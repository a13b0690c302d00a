//! The one place the views format what they share: durations, endpoints and peers, owners, and
//! proto enum names without their prefix.
use std::fmt::Write as _;

use crate::proto;

pub fn state_name(value: i32) -> &'static str {
    proto::TcpState::try_from(value)
        .map(|s| s.as_str_name().trim_start_matches("TCP_STATE_"))
        .unwrap_or("?")
}

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

/// An enum value's name without its prefix, in lower case with spaces: `reset received`.
pub fn write_enum_name(out: &mut String, name: Option<&str>, prefix: &str) {
    match name {
        Some(name) => out.extend(name.trim_start_matches(prefix).chars().map(|c| {
            if c == '_' {
                ' '
            } else {
                c.to_ascii_lowercase()
            }
        })),
        None => out.push('?'),
    }
}

pub fn enum_name(name: Option<&str>, prefix: &str) -> String {
    let mut out = String::new();
    write_enum_name(&mut out, name, prefix);
    out
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
}
