//! A closed connection's log record, written straight into its protobuf encoding.
//!
//! Built as an `opentelemetry_proto` `LogRecord`, a record would take some forty allocations (a
//! `String` for every attribute's key and for each address, the body, the vectors) on the
//! pipeline's thread, and prost would compute each nested message's length once per level
//! above it. This writes the same message (the tests decode it with prost and compare with the
//! message built that way) into the batch's buffer: no allocation per record. Resource and
//! scope are encoded once, when the exporter starts, and framed around each batch's records.
use std::{fmt::Write as _, net::IpAddr};

use bytes::{BufMut, Bytes, BytesMut};
use opentelemetry_proto::tonic::{
    common::v1::InstrumentationScope, logs::v1::SeverityNumber, resource::v1::Resource,
};
use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint},
};

use super::unix_ns;
use crate::{
    event::Clock,
    export::metrics::{cause_name, closer_name},
    lifecycle::{Closer, Connection, Direction},
};

pub(super) const EVENT_NAME: &str = "tcptrace.connection.closed";
pub(super) const SEVERITY_TEXT: &str = "INFO";

/// Field numbers of the OTLP messages written here (opentelemetry/proto/logs/v1/logs.proto,
/// common/v1/common.proto, collector/logs/v1/logs_service.proto).
mod field {
    pub const REQUEST_RESOURCE_LOGS: u32 = 1;
    pub const RESOURCE_LOGS_RESOURCE: u32 = 1;
    pub const RESOURCE_LOGS_SCOPE_LOGS: u32 = 2;
    pub const SCOPE_LOGS_SCOPE: u32 = 1;
    pub const SCOPE_LOGS_LOG_RECORDS: u32 = 2;
    pub const TIME_UNIX_NANO: u32 = 1;
    pub const OBSERVED_TIME_UNIX_NANO: u32 = 11;
    pub const SEVERITY_NUMBER: u32 = 2;
    pub const SEVERITY_TEXT: u32 = 3;
    pub const BODY: u32 = 5;
    pub const ATTRIBUTES: u32 = 6;
    pub const EVENT_NAME: u32 = 12;
    pub const KEY: u32 = 1;
    pub const VALUE: u32 = 2;
    pub const STRING_VALUE: u32 = 1;
    pub const BOOL_VALUE: u32 = 2;
    pub const INT_VALUE: u32 = 3;
    pub const DOUBLE_VALUE: u32 = 4;
}

/// An attribute's value, as `AnyValue`'s oneof.
#[derive(Clone, Copy)]
enum Value<'a> {
    Str(&'a str),
    Int(i64),
    Double(f64),
    Bool(bool),
}

impl Value<'_> {
    /// The encoded length of the `AnyValue` holding it.
    fn any_value_len(self) -> usize {
        1 + match self {
            Value::Str(s) => encoded_len_varint(s.len() as u64) + s.len(),
            Value::Int(i) => encoded_len_varint(i as u64),
            Value::Double(_) => 8,
            Value::Bool(_) => 1,
        }
    }

    fn encode_any_value(self, buf: &mut impl BufMut) {
        match self {
            Value::Str(s) => str_field(buf, field::STRING_VALUE, s),
            Value::Int(i) => {
                encode_key(field::INT_VALUE, WireType::Varint, buf);
                encode_varint(i as u64, buf);
            }
            Value::Double(d) => {
                encode_key(field::DOUBLE_VALUE, WireType::SixtyFourBit, buf);
                buf.put_f64_le(d);
            }
            Value::Bool(b) => {
                encode_key(field::BOOL_VALUE, WireType::Varint, buf);
                buf.put_u8(u8::from(b));
            }
        }
    }
}

/// A string field, written even when empty (where prost leaves an empty proto3 string out,
/// callers here never have one).
fn str_field(buf: &mut impl BufMut, tag: u32, s: &str) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(s.len() as u64, buf);
    buf.put_slice(s.as_bytes());
}

/// A `KeyValue` as an entry of a repeated `attributes` field.
fn attribute(buf: &mut impl BufMut, key: &str, value: Value<'_>) {
    let any_len = value.any_value_len();
    let kv_len = 1
        + encoded_len_varint(key.len() as u64)
        + key.len()
        + 1
        + encoded_len_varint(any_len as u64)
        + any_len;
    encode_key(field::ATTRIBUTES, WireType::LengthDelimited, buf);
    encode_varint(kv_len as u64, buf);
    str_field(buf, field::KEY, key);
    encode_key(field::VALUE, WireType::LengthDelimited, buf);
    encode_varint(any_len as u64, buf);
    value.encode_any_value(buf);
}

fn fixed64(buf: &mut impl BufMut, tag: u32, value: u64) {
    // proto3 leaves zeros out.
    if value != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.put_u64_le(value);
    }
}

/// Writes records: the scratch space one record takes before its length is known.
#[derive(Default)]
pub(super) struct RecordWriter {
    record: Vec<u8>,
    text: String,
}

impl RecordWriter {
    /// Appends the record of `c` to `out` as a `ScopeLogs.log_records` entry. `now_ns` is when
    /// the agent saw the connection end (the record's observed time).
    pub fn write(&mut self, out: &mut Vec<u8>, c: &Connection, clock: &Clock, now_ns: u64) {
        let RecordWriter { record, text } = self;
        record.clear();
        text.clear();
        let (local, peer) = (c.local(), c.remote());
        // The addresses' text, each used twice, and the body; ranges into one buffer.
        let local_ip = push_ip(text, local.ip());
        let peer_ip = push_ip(text, peer.ip());
        let cause = cause_name(c.cause());
        let first_closer = c.first_closer();
        let closer = closer_name(first_closer);
        let body_at = text.len();
        // Writing into a String cannot fail.
        let _ = write!(
            text,
            "{} {local} -> {peer} closed: {cause}",
            c.direction.name()
        );
        if first_closer != Closer::None {
            let _ = write!(text, ", {closer} sent the first FIN");
        }
        let (local_ip, peer_ip, body) = (
            &text[local_ip.0..local_ip.1],
            &text[peer_ip.0..peer_ip.1],
            &text[body_at..],
        );

        // In prost's order: by field number.
        fixed64(
            record,
            field::TIME_UNIX_NANO,
            unix_ns(clock.wall(c.last_ns)),
        );
        encode_key(field::SEVERITY_NUMBER, WireType::Varint, record);
        encode_varint(SeverityNumber::Info as u64, record);
        str_field(record, field::SEVERITY_TEXT, SEVERITY_TEXT);
        let body_value = Value::Str(body);
        encode_key(field::BODY, WireType::LengthDelimited, record);
        encode_varint(body_value.any_value_len() as u64, record);
        body_value.encode_any_value(record);

        let mut attr = |key: &str, value: Value<'_>| attribute(record, key, value);
        attr("network.transport", Value::Str("tcp"));
        let family = if local.is_ipv4() { "ipv4" } else { "ipv6" };
        attr("network.type", Value::Str(family));
        attr("network.local.address", Value::Str(local_ip));
        attr("network.local.port", Value::Int(local.port().into()));
        attr("network.peer.address", Value::Str(peer_ip));
        attr("network.peer.port", Value::Int(peer.port().into()));
        let client_server = match c.direction {
            Direction::Active => Some(((local_ip, local), (peer_ip, peer))),
            Direction::Passive => Some(((peer_ip, peer), (local_ip, local))),
            Direction::Listen | Direction::Unknown => None,
        };
        if let Some(((client_ip, client), (server_ip, server))) = client_server {
            attr("client.address", Value::Str(client_ip));
            attr("client.port", Value::Int(client.port().into()));
            attr("server.address", Value::Str(server_ip));
            attr("server.port", Value::Int(server.port().into()));
        }
        if let Some(owner) = c.owner() {
            attr("process.pid", Value::Int(owner.task.pid.into()));
        }
        let id = i64::try_from(c.id).unwrap_or(i64::MAX);
        attr("tcptrace.connection.id", Value::Int(id));
        attr("tcptrace.netns", Value::Int(c.netns.into()));
        attr("tcptrace.direction", Value::Str(c.direction.name()));
        attr("tcptrace.close.cause", Value::Str(cause));
        attr("tcptrace.close.closer", Value::Str(closer));
        attr("tcptrace.retransmits", Value::Int(c.retransmits().into()));
        let handshake_retransmits = c.handshake_retransmits().into();
        attr(
            "tcptrace.handshake.retransmits",
            Value::Int(handshake_retransmits),
        );
        let keepalive = c.keepalive();
        attr("tcptrace.keepalive.enabled", Value::Bool(keepalive.enabled));
        attr(
            "tcptrace.keepalive.probes",
            Value::Int(keepalive.probes.into()),
        );
        if c.seen_open() {
            attr("tcptrace.duration", Value::Double(seconds(c.duration_ns())));
        }
        if let Some(ns) = c.handshake_ns() {
            attr("tcptrace.handshake.duration", Value::Double(seconds(ns)));
        }
        fixed64(record, field::OBSERVED_TIME_UNIX_NANO, now_ns);
        str_field(record, field::EVENT_NAME, EVENT_NAME);

        encode_key(
            field::SCOPE_LOGS_LOG_RECORDS,
            WireType::LengthDelimited,
            out,
        );
        encode_varint(record.len() as u64, out);
        out.extend_from_slice(record);
    }
}

/// Appends `ip`'s text; returns where it is.
fn push_ip(text: &mut String, ip: IpAddr) -> (usize, usize) {
    let at = text.len();
    // Writing into a String cannot fail.
    let _ = write!(text, "{ip}");
    (at, text.len())
}

fn seconds(ns: u64) -> f64 {
    ns as f64 * 1e-9
}

/// The parts of every request that never change: the resource and the scope, encoded once.
pub(super) struct Framing {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Framing {
    pub fn new(resource: &Resource, scope: &InstrumentationScope) -> Framing {
        Framing {
            resource: resource.encode_to_vec(),
            scope: scope.encode_to_vec(),
        }
    }

    /// The `ExportLogsServiceRequest` of one resource and scope holding `records` (entries
    /// written by [`RecordWriter::write`]).
    pub fn request(&self, records: &[u8]) -> Bytes {
        let field_len = |len: usize| 1 + encoded_len_varint(len as u64) + len;
        let scope_logs = field_len(self.scope.len()) + records.len();
        let resource_logs = field_len(self.resource.len()) + field_len(scope_logs);
        let mut buf = BytesMut::with_capacity(field_len(resource_logs));
        let open = |buf: &mut BytesMut, tag: u32, len: usize| {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(len as u64, buf);
        };
        open(&mut buf, field::REQUEST_RESOURCE_LOGS, resource_logs);
        open(&mut buf, field::RESOURCE_LOGS_RESOURCE, self.resource.len());
        buf.put_slice(&self.resource);
        open(&mut buf, field::RESOURCE_LOGS_SCOPE_LOGS, scope_logs);
        open(&mut buf, field::SCOPE_LOGS_SCOPE, self.scope.len());
        buf.put_slice(&self.scope);
        buf.put_slice(records);
        buf.freeze()
    }
}

/// An encoded `ExportLogsServiceRequest`, sent as it is by tonic's prost codec (which only asks
/// a message to write itself).
#[derive(Clone, Debug, Default)]
pub(super) struct EncodedRequest(pub Bytes);

impl Message for EncodedRequest {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Never decoded: the agent only sends these.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
pub(super) mod tests {
    use opentelemetry_proto::tonic::{
        collector::logs::v1::ExportLogsServiceRequest,
        common::v1::{AnyValue, KeyValue, any_value},
        logs::v1::LogRecord,
    };

    use super::{
        super::{kv, resource, scope, text},
        *,
    };
    use crate::{
        lifecycle::{Peers, Table, testing::LIVES},
        model::{Context, Task, TcpState::*, Transition, errno::ECONNREFUSED},
    };

    fn int(key: &str, value: impl Into<i64>) -> KeyValue {
        kv(key, any_value::Value::IntValue(value.into()))
    }

    fn double_seconds(key: &str, ns: u64) -> KeyValue {
        kv(key, any_value::Value::DoubleValue(ns as f64 * 1e-9))
    }

    /// The record as the exporter built it before it wrote the encoding itself: the reference.
    fn log_record(c: &Connection, clock: &Clock, now_ns: u64) -> LogRecord {
        let (local, peer) = (c.local(), c.remote());
        let mut attributes = vec![
            text("network.transport", "tcp"),
            text(
                "network.type",
                if local.is_ipv4() { "ipv4" } else { "ipv6" },
            ),
            text("network.local.address", local.ip().to_string()),
            int("network.local.port", local.port()),
            text("network.peer.address", peer.ip().to_string()),
            int("network.peer.port", peer.port()),
        ];
        let client_server = match c.direction {
            Direction::Active => Some((local, peer)),
            Direction::Passive => Some((peer, local)),
            Direction::Listen | Direction::Unknown => None,
        };
        if let Some((client, server)) = client_server {
            attributes.extend([
                text("client.address", client.ip().to_string()),
                int("client.port", client.port()),
                text("server.address", server.ip().to_string()),
                int("server.port", server.port()),
            ]);
        }
        if let Some(owner) = c.owner() {
            attributes.push(int("process.pid", owner.task.pid));
        }
        let cause = cause_name(c.cause());
        let closer = closer_name(c.first_closer());
        attributes.extend([
            int(
                "tcptrace.connection.id",
                i64::try_from(c.id).unwrap_or(i64::MAX),
            ),
            int("tcptrace.netns", c.netns),
            text("tcptrace.direction", c.direction.name()),
            text("tcptrace.close.cause", cause),
            text("tcptrace.close.closer", closer),
            int("tcptrace.retransmits", c.retransmits()),
            int("tcptrace.handshake.retransmits", c.handshake_retransmits()),
            kv(
                "tcptrace.keepalive.enabled",
                any_value::Value::BoolValue(c.keepalive().enabled),
            ),
            int("tcptrace.keepalive.probes", c.keepalive().probes),
        ]);
        if c.seen_open() {
            attributes.push(double_seconds("tcptrace.duration", c.duration_ns()));
        }
        if let Some(ns) = c.handshake_ns() {
            attributes.push(double_seconds("tcptrace.handshake.duration", ns));
        }
        let body = format!(
            "{} {} -> {} closed: {cause}{}",
            c.direction.name(),
            local,
            peer,
            if c.first_closer() == Closer::None {
                String::new()
            } else {
                format!(", {closer} sent the first FIN")
            }
        );
        LogRecord {
            time_unix_nano: unix_ns(clock.wall(c.last_ns)),
            observed_time_unix_nano: now_ns,
            severity_number: SeverityNumber::Info as i32,
            severity_text: SEVERITY_TEXT.into(),
            event_name: EVENT_NAME.into(),
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue(body)),
            }),
            attributes,
            ..Default::default()
        }
    }

    /// Connections of every life the table knows, over IPv4 and IPv6, with and without an owner.
    pub(in crate::export) fn closed_connections() -> Vec<Connection> {
        let mut table = Table::new(1000, Peers::new(10, 1_000_000_000));
        let addrs: [(&str, &str); 4] = [
            ("127.0.0.1:40000", "127.0.0.1:8080"),
            ("198.51.100.7:65535", "198.51.100.200:1"),
            (
                "[2001:db8::1]:41000",
                "[2001:db8:ffff:ffff:ffff:ffff:ffff:fffe]:443",
            ),
            ("[::1]:0", "[::ffff:198.51.100.1]:80"),
        ];
        let mut closed = Vec::new();
        let mut ts = 1_000_000_000_000;
        for (i, life) in LIVES.iter().enumerate() {
            for (j, (local, remote)) in addrs.iter().enumerate() {
                let sock = (i * 10 + j + 1) as u64 * 64;
                let n = life.len();
                for (k, &(old, new)) in life.iter().enumerate() {
                    ts += 123_456_789;
                    let t = Transition::test(sock, ts, old, new)
                        .in_netns(4_026_531_840 + j as u32)
                        .between(local.parse().unwrap(), remote.parse().unwrap())
                        .rtt(40, (j % 3) as u32)
                        .bytes(1, 1);
                    let t = if j % 2 == 0 && k == 0 {
                        t.by(Context::Process(Task::test(4242 + j as u32, "curl")))
                    } else {
                        t
                    };
                    let t = if (old, new) == (SynSent, Close) {
                        t.error(ECONNREFUSED)
                    } else {
                        t
                    };
                    let applied = table.apply(&t);
                    if k == n - 1 {
                        closed.push(applied.connection.clone());
                    }
                }
            }
        }
        closed
    }

    #[test]
    fn a_batch_decodes_as_the_request_the_otlp_protos_describe() {
        let clock = Clock::now();
        let (resource, scope) = (resource(), scope());
        let framing = Framing::new(&resource, &scope);
        let mut writer = RecordWriter::default();
        let mut records = Vec::new();
        let connections = closed_connections();
        for (i, c) in connections.iter().enumerate() {
            writer.write(
                &mut records,
                c,
                &clock,
                1_700_000_000_000_000_000 + i as u64,
            );
        }
        let request = framing.request(&records);
        let decoded = ExportLogsServiceRequest::decode(request.clone()).unwrap();
        assert_eq!(decoded.resource_logs.len(), 1);
        let resource_logs = &decoded.resource_logs[0];
        assert_eq!(resource_logs.resource.as_ref(), Some(&resource));
        assert_eq!(resource_logs.scope_logs.len(), 1);
        let scope_logs = &resource_logs.scope_logs[0];
        assert_eq!(scope_logs.scope.as_ref(), Some(&scope));
        assert_eq!(scope_logs.log_records.len(), connections.len());
        for (i, (c, got)) in connections.iter().zip(&scope_logs.log_records).enumerate() {
            let expected = log_record(c, &clock, 1_700_000_000_000_000_000 + i as u64);
            assert_eq!(got, &expected, "{c:?}");
        }
        // Fields in prost's order, so the bytes are prost's too.
        assert_eq!(request, Bytes::from(decoded.encode_to_vec()));
    }

    #[test]
    fn a_request_goes_out_through_prosts_codec_as_it_is() {
        let bytes = Bytes::from_static(b"\x0a\x02\x0a\x00");
        let request = EncodedRequest(bytes.clone());
        assert_eq!(request.encoded_len(), bytes.len());
        assert_eq!(request.encode_to_vec(), bytes.to_vec());
    }
}
