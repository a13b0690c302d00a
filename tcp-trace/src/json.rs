//! Events as JSON: the canonical proto3 JSON mapping (lowerCamelCase names, enums by name,
//! 64-bit integers as strings, RFC 3339 timestamps), via the embedded descriptor set.
use std::sync::OnceLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use crate::proto;

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set decodes")
    })
}

/// One message as a single line of proto3 JSON.
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

pub fn event(event: &proto::Event) -> String {
    to_json(event, "tcptrace.v1.Event")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_use_the_proto3_json_mapping() {
        let event = proto::Event {
            seq: 7,
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 500_000_000,
            }),
            kernel_time_ns: 123,
            connection: Some(proto::Connection {
                id: 3,
                local: Some(proto::Endpoint {
                    address: "::1".into(),
                    port: 8080,
                }),
                direction: proto::Direction::Passive as i32,
                ..Default::default()
            }),
            body: Some(proto::event::Body::StateChange(proto::StateChange {
                old_state: proto::TcpState::Listen as i32,
                new_state: proto::TcpState::SynRecv as i32,
                task: None,
                context: "kernel".into(),
                ..Default::default()
            })),
        };
        let json: serde_json::Value = serde_json::from_str(&super::event(&event)).unwrap();
        assert_eq!(json["seq"], "7", "64-bit integers are strings");
        assert_eq!(json["time"], "2023-11-14T22:13:20.500Z");
        assert_eq!(json["kernelTimeNs"], "123");
        assert_eq!(json["connection"]["direction"], "DIRECTION_PASSIVE");
        assert_eq!(json["connection"]["local"]["port"], 8080);
        assert_eq!(json["stateChange"]["oldState"], "TCP_STATE_LISTEN");
        assert_eq!(json["stateChange"]["newState"], "TCP_STATE_SYN_RECV");
        assert!(
            json["connection"].get("sock").is_none(),
            "defaults are omitted"
        );
    }
}
