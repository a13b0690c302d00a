//! The capabilities the agent uses, so that a hook or feature that fails for want of one can
//! name it (README "Install": the set, measured, and what each one is for).

/// A Linux capability: its bit in `CapEff` and its name as `capsh` and systemd spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub bit: u32,
    pub name: &'static str,
}

/// Reading tracefs (mode 0700, root's) as a user other than root.
pub const DAC_READ_SEARCH: Cap = Cap {
    bit: 2,
    name: "CAP_DAC_READ_SEARCH",
};
/// Loading the cgroup setsockopt program (CAP_SYS_ADMIN also does).
pub const NET_ADMIN: Cap = Cap {
    bit: 12,
    name: "CAP_NET_ADMIN",
};
/// Opening /proc/PID/ns/net of processes of other users.
pub const SYS_PTRACE: Cap = Cap {
    bit: 19,
    name: "CAP_SYS_PTRACE",
};
/// setns() into other network namespaces, and mounting tracefs.
pub const SYS_ADMIN: Cap = Cap {
    bit: 21,
    name: "CAP_SYS_ADMIN",
};
/// Addresses in /proc/kallsyms (all zeros without it).
pub const SYSLOG: Cap = Cap {
    bit: 34,
    name: "CAP_SYSLOG",
};
pub const PERFMON: Cap = Cap {
    bit: 38,
    name: "CAP_PERFMON",
};
pub const BPF: Cap = Cap {
    bit: 39,
    name: "CAP_BPF",
};

/// This process's effective capabilities, from /proc/self/status (none if it cannot be read).
pub fn effective() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn has(cap: Cap) -> bool {
    effective() & (1 << cap.bit) != 0
}

/// "; WHAT needs CAP_X, which this process lacks", or nothing when it has CAP_X: appended to
/// the one line that says a hook or feature is missing.
pub fn lacking(cap: Cap, what: &str) -> String {
    if has(cap) {
        String::new()
    } else {
        format!("; {what} needs {}, which this process lacks", cap.name)
    }
}

/// The keepalive defaults of another network namespace are read from inside it: opening
/// /proc/PID/ns/net of another user's process needs CAP_SYS_PTRACE, setns() into it
/// CAP_SYS_ADMIN. Without them the agent assumes Linux's defaults; say so at start-up.
pub fn namespace_access() -> Option<String> {
    let missing: Vec<&str> = [SYS_ADMIN, SYS_PTRACE]
        .into_iter()
        .filter(|cap| !has(*cap))
        .map(|cap| cap.name)
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "setns into other network namespaces (this process lacks {}): keepalive defaults \
             there are assumed to be Linux's (idle 7200 s, every 75 s, 9 probes), not read",
            missing.join(" and ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lacking_names_the_capability_only_when_it_is_missing() {
        let note = lacking(BPF, "loading");
        if has(BPF) {
            assert_eq!(note, "");
        } else {
            assert_eq!(note, "; loading needs CAP_BPF, which this process lacks");
        }
    }
}
