//! `conns`: the live connections as a table.
use std::fmt::Write as _;

use super::format::{direction_name, duration, owner, state_name, tuple};
use crate::proto;

/// The live connections as a table.
pub fn connections_table(
    conns: &[proto::Connection],
    matched: u64,
    now: std::time::SystemTime,
) -> String {
    let mut out = format!(
        "{:>8}  {:<8} {:<12} {:<46} {:<11} {:<22} {:>9}\n",
        "ID", "DIR", "STATE", "LOCAL / REMOTE", "NETNS", "OWNER", "AGE"
    );
    for c in conns {
        let age = c
            .opened_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .and_then(|t| now.duration_since(t).ok())
            .and_then(|d| prost_types::Duration::try_from(d).ok());
        let _ = writeln!(
            out,
            "{:>8}  {:<8} {:<12} {:<46} {:<11} {:<22} {:>9}",
            c.id,
            direction_name(c.direction),
            state_name(c.state),
            tuple(c),
            c.netns,
            owner(c.owner.as_ref()),
            duration(age.as_ref()),
        );
    }
    if matched > conns.len() as u64 {
        let _ = write!(out, "{} of {matched} connections", conns.len());
    } else {
        let _ = write!(out, "{} connections", conns.len());
    }
    out
}
