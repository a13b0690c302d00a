//! Messages as JSON: the canonical proto3 JSON mapping (lowerCamelCase names, enums by name,
//! 64-bit integers as strings, RFC 3339 timestamps, default values omitted).
//!
//! Events, which `watch --json` prints by the hundred thousand a second, are written by hand
//! straight into a reused buffer ([`EventWriter`]); the rare answers (connections, stats) go
//! through the embedded descriptor set with prost-reflect, whose output the hand-written
//! writer is tested against byte for byte.
use std::{io::Write as _, sync::OnceLock};

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use crate::proto::{self, event::Body};

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set decodes")
    })
}

/// One message as a single line of proto3 JSON, through its descriptor.
pub fn to_json<M: Message>(message: &M, full_name: &str) -> String {
    let descriptor = pool()
        .get_message_by_name(full_name)
        .unwrap_or_else(|| panic!("{full_name} is in the descriptor set"));
    let bytes = message.encode_to_vec();
    let dynamic = DynamicMessage::decode(descriptor, bytes.as_slice())
        .expect("a message re-decodes with its own descriptor");
    let mut out = Vec::with_capacity(bytes.len() * 3);
    let mut serializer = serde_json::Serializer::new(&mut out);
    dynamic
        .serialize_with_options(&mut serializer, &SerializeOptions::new())
        .expect("JSON serialization into memory does not fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// One event as a line of JSON (allocates; for a stream use [`EventWriter`]).
pub fn event(event: &proto::Event) -> String {
    let mut out = Vec::new();
    EventWriter::default().write(&mut out, event);
    String::from_utf8(out).expect("the event writer writes UTF-8")
}

/// Writes events as proto3 JSON, without a newline, appending to a caller's buffer. Keeps the
/// date and time of the last whole second it wrote: consecutive events share it.
#[derive(Default)]
pub struct EventWriter {
    second: Option<(i64, [u8; 19])>,
}

impl EventWriter {
    pub fn write(&mut self, out: &mut Vec<u8>, event: &proto::Event) {
        let mut w = Json {
            out,
            first: true,
            second: &mut self.second,
        };
        w.begin();
        w.u64("seq", event.seq);
        if let Some(time) = &event.time {
            w.key("time");
            w.timestamp(time);
        }
        w.u64("kernelTimeNs", event.kernel_time_ns);
        w.message("connection", event.connection.as_ref(), connection);
        match &event.body {
            Some(Body::StateChange(b)) => w.message("stateChange", Some(b), state_change),
            Some(Body::ConnectionClosed(b)) => {
                w.message("connectionClosed", Some(b), connection_closed)
            }
            Some(Body::Lost(b)) => w.message("lost", Some(b), lost),
            Some(Body::Retransmit(b)) => w.message("retransmit", Some(b), retransmit),
            Some(Body::Reset(b)) => w.message("reset", Some(b), reset),
            Some(Body::Keepalive(b)) => w.message("keepalive", Some(b), keepalive),
            None => {}
        }
        w.end();
    }
}

fn connection(w: &mut Json, c: &proto::Connection) {
    w.u64("id", c.id);
    w.u64("sock", c.sock);
    w.u32("ipVersion", c.ip_version);
    w.message("local", c.local.as_ref(), endpoint);
    w.message("remote", c.remote.as_ref(), endpoint);
    w.u64("netns", c.netns);
    w.enumeration("direction", c.direction, direction_name);
    w.message("owner", c.owner.as_ref(), process);
    w.enumeration("state", c.state, state_name);
    if let Some(t) = &c.opened_at {
        w.key("openedAt");
        w.timestamp(t);
    }
    w.duration("handshakeLatency", c.handshake_latency.as_ref());
    w.message("keepalive", c.keepalive.as_ref(), keepalive_settings);
}

fn endpoint(w: &mut Json, e: &proto::Endpoint) {
    w.string("address", &e.address);
    w.u32("port", e.port);
}

fn process(w: &mut Json, p: &proto::Process) {
    w.u32("pid", p.pid);
    w.u32("tid", p.tid);
    w.string("comm", &p.comm);
    w.enumeration("attribution", p.attribution, |v| {
        proto::Attribution::try_from(v)
            .ok()
            .map(|a| a.as_str_name())
    });
}

fn handshake(w: &mut Json, h: &proto::Handshake) {
    w.duration("latency", h.latency.as_ref());
    w.u32("retransmits", h.retransmits);
}

fn keepalive_settings(w: &mut Json, k: &proto::KeepaliveSettings) {
    w.bool("enabled", k.enabled);
    w.u32("idleSeconds", k.idle_seconds);
    w.u32("intervalSeconds", k.interval_seconds);
    w.u32("count", k.count);
    w.bool("idleSet", k.idle_set);
    w.bool("intervalSet", k.interval_set);
    w.bool("countSet", k.count_set);
}

fn state_change(w: &mut Json, s: &proto::StateChange) {
    w.enumeration("oldState", s.old_state, state_name);
    w.enumeration("newState", s.new_state, state_name);
    w.message("task", s.task.as_ref(), process);
    w.string("context", &s.context);
    w.message("handshake", s.handshake.as_ref(), handshake);
    w.u32("error", s.error);
    w.string("errorName", &s.error_name);
}

fn connection_closed(w: &mut Json, c: &proto::ConnectionClosed) {
    if !c.path.is_empty() {
        w.key("path");
        w.out.push(b'[');
        for (i, &state) in c.path.iter().enumerate() {
            if i > 0 {
                w.out.push(b',');
            }
            w.enum_value(state, state_name);
        }
        w.out.push(b']');
    }
    w.duration("duration", c.duration.as_ref());
    w.bool("seenOpen", c.seen_open);
    w.enumeration("cause", c.cause, |v| {
        proto::CloseCause::try_from(v).ok().map(|c| c.as_str_name())
    });
    w.enumeration("firstFin", c.first_fin, |v| {
        proto::Closer::try_from(v).ok().map(|c| c.as_str_name())
    });
    w.enumeration("lifetime", c.lifetime, |v| {
        proto::Lifetime::try_from(v).ok().map(|l| l.as_str_name())
    });
    w.message("handshake", c.handshake.as_ref(), handshake);
    w.u32("failedHandshakeRetransmits", c.failed_handshake_retransmits);
    w.u32("retransmits", c.retransmits);
    w.u32("resetsSent", c.resets_sent);
    w.u32("resetsReceived", c.resets_received);
    w.u32("error", c.error);
    w.string("errorName", &c.error_name);
    w.message("keepalive", c.keepalive.as_ref(), keepalive_settings);
    w.u32("keepaliveProbes", c.keepalive_probes);
    w.u32("keepaliveUnanswered", c.keepalive_unanswered);
    w.u32("srttUs", c.srtt_us);
    w.u64("bytesSent", c.bytes_sent);
    w.u64("bytesReceived", c.bytes_received);
}

fn retransmit(w: &mut Json, r: &proto::Retransmit) {
    w.enumeration("state", r.state, state_name);
    w.u32("count", r.count);
}

fn reset(w: &mut Json, r: &proto::Reset) {
    w.bool("sent", r.sent);
    w.u32("reason", r.reason);
    w.bool("withoutSocket", r.without_socket);
}

fn lost(w: &mut Json, l: &proto::Lost) {
    w.u64("count", l.count);
    w.enumeration("stage", l.stage, |v| {
        proto::LossStage::try_from(v).ok().map(|s| s.as_str_name())
    });
    w.u64("ringFull", l.ring_full);
    w.u64("runsSkipped", l.runs_skipped);
    w.u64("firstSeq", l.first_seq);
}

fn keepalive(w: &mut Json, k: &proto::Keepalive) {
    w.enumeration("what", k.what, |v| {
        proto::keepalive::What::try_from(v)
            .ok()
            .map(|w| w.as_str_name())
    });
    w.u32("probe", k.probe);
    w.message("settings", k.settings.as_ref(), keepalive_settings);
    w.message("by", k.by.as_ref(), process);
}

fn state_name(v: i32) -> Option<&'static str> {
    proto::TcpState::try_from(v).ok().map(|s| s.as_str_name())
}

fn direction_name(v: i32) -> Option<&'static str> {
    proto::Direction::try_from(v).ok().map(|d| d.as_str_name())
}

/// Writes one object's fields in declaration order, skipping default scalars as proto3 JSON
/// does (message fields that are present are written, even when empty).
struct Json<'a> {
    out: &'a mut Vec<u8>,
    /// No field written yet in the current object.
    first: bool,
    second: &'a mut Option<(i64, [u8; 19])>,
}

impl Json<'_> {
    fn begin(&mut self) {
        self.out.push(b'{');
        self.first = true;
    }

    fn end(&mut self) {
        self.out.push(b'}');
        self.first = false;
    }

    fn key(&mut self, name: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn message<T>(&mut self, name: &str, value: Option<&T>, fields: impl FnOnce(&mut Self, &T)) {
        if let Some(value) = value {
            self.key(name);
            self.begin();
            fields(self, value);
            self.end();
        }
    }

    fn u32(&mut self, name: &str, v: u32) {
        if v != 0 {
            self.key(name);
            push_u64(self.out, v.into());
        }
    }

    /// 64-bit integers are strings in proto3 JSON (JavaScript numbers lose precision).
    fn u64(&mut self, name: &str, v: u64) {
        if v != 0 {
            self.key(name);
            self.out.push(b'"');
            push_u64(self.out, v);
            self.out.push(b'"');
        }
    }

    fn bool(&mut self, name: &str, v: bool) {
        if v {
            self.key(name);
            self.out.extend_from_slice(b"true");
        }
    }

    fn string(&mut self, name: &str, v: &str) {
        if !v.is_empty() {
            self.key(name);
            push_str(self.out, v);
        }
    }

    fn enumeration(&mut self, name: &str, v: i32, names: impl Fn(i32) -> Option<&'static str>) {
        if v != 0 {
            self.key(name);
            self.enum_value(v, names);
        }
    }

    /// An enum by name; a number this build does not know stays a number.
    fn enum_value(&mut self, v: i32, names: impl Fn(i32) -> Option<&'static str>) {
        match names(v) {
            Some(name) => {
                self.out.push(b'"');
                self.out.extend_from_slice(name.as_bytes());
                self.out.push(b'"');
            }
            None => {
                let _ = write!(self.out, "{v}");
            }
        }
    }

    /// `"1.020s"`: seconds with 0, 3, 6 or 9 fractional digits.
    fn duration(&mut self, name: &str, d: Option<&prost_types::Duration>) {
        let Some(d) = d else { return };
        self.key(name);
        if d.seconds >= 0 && (0..1_000_000_000).contains(&d.nanos) {
            self.out.push(b'"');
            push_u64(self.out, d.seconds as u64);
            push_fraction(self.out, d.nanos as u32);
            self.out.extend_from_slice(b"s\"");
        } else {
            // Negative or unnormalised: prost-types normalises and signs it.
            let _ = write!(self.out, "\"{d}\"");
        }
    }

    /// RFC 3339 in UTC, `"2023-11-14T22:13:20.500Z"`.
    fn timestamp(&mut self, t: &prost_types::Timestamp) {
        // Years 1970 to 9999: a fixed 19-byte date and time, computed once per second.
        const LAST: i64 = 253_402_300_799;
        if !(0..=LAST).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
            let _ = write!(self.out, "\"{t}\"");
            return;
        }
        let date = match self.second {
            Some((second, date)) if *second == t.seconds => *date,
            _ => {
                // prost-types writes a whole second as `YYYY-MM-DDTHH:MM:SSZ`.
                let whole = prost_types::Timestamp {
                    seconds: t.seconds,
                    nanos: 0,
                };
                let mut text = [0u8; 20];
                let _ = write!(&mut text[..], "{whole}");
                let mut date = [0u8; 19];
                date.copy_from_slice(&text[..19]);
                *self.second = Some((t.seconds, date));
                date
            }
        };
        self.out.push(b'"');
        self.out.extend_from_slice(&date);
        push_fraction(self.out, t.nanos as u32);
        self.out.extend_from_slice(b"Z\"");
    }
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Fractional seconds as the JSON mapping writes them: none, or 3, 6 or 9 digits.
fn push_fraction(out: &mut Vec<u8>, nanos: u32) {
    let (value, width) = match nanos {
        0 => return,
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    out.push(b'.');
    let mut digits = [b'0'; 9];
    let mut v = value;
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&digits[..width]);
}

/// A JSON string. Most strings here (addresses, task names) need no escape; the others go
/// through serde_json, so escapes are exactly what the prost-reflect path writes.
fn push_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("writing to memory does not fail");
    }
}

#[cfg(test)]
mod tests;
