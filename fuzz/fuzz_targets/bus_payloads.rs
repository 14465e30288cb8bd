//! Every decoder of what arrives from the bus or inside a frame body: the fleet and tunnel
//! payloads (`from_bus`), the typed frame bodies in both codecs (`decode_body`), the signed
//! command envelope, the envelopes read from NATS headers (`from_headers`), subjects, hop
//! stamps, `traceparent`, config names and bounded inflate. Arbitrary bytes must never
//! panic; the first byte picks the decoder.
#![no_main]

use std::str::FromStr;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use messages::envelope::{
    AckEnvelope, AgentClose, DeliveredEnvelope, HeartbeatEnvelope, PushEnvelope,
    SessionEnvelope, UpstreamEnvelope,
};
use messages::payload::{self, decode_body, from_bus};
use messages::{BodyCodec, Subject, TraceContext, command, fleet, headers, tunnel};

/// Decodes `data` as `T` from the bus and in both frame-body codecs.
fn all<T: serde::de::DeserializeOwned>(data: &[u8]) {
    let _ = from_bus::<T>(data);
    let _ = decode_body::<T>(BodyCodec::Json, data);
    let _ = decode_body::<T>(BodyCodec::MsgPack, data);
}

/// A header map from `name: value` lines (invalid names or values are skipped, as the
/// NATS client would never deliver them).
fn header_map(data: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in String::from_utf8_lossy(data).split('\n') {
        if let Some((k, v)) = line.split_once(':')
            && let (Ok(k), Ok(v)) = (HeaderName::from_str(k.trim()), HeaderValue::from_str(v.trim()))
        {
            map.append(k, v);
        }
    }
    map
}

fuzz_target!(|input: &[u8]| {
    let Some((&which, data)) = input.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(data);
    match which % 40 {
        0 => all::<fleet::Register>(data),
        1 => all::<fleet::ConfigPush>(data),
        2 => all::<fleet::ConfigAck>(data),
        3 => {
            if let Ok(m) = from_bus::<fleet::UpgradeManifest>(data) {
                let _ = m.check("linux", "x86_64");
            }
        }
        4 => all::<fleet::UpgradeResult>(data),
        5 => all::<fleet::Report>(data),
        6 => all::<fleet::ReportBatch>(data),
        7 => all::<fleet::Task>(data),
        8 => all::<fleet::Cancel>(data),
        9 => all::<fleet::TaskStarted>(data),
        10 => all::<fleet::TaskOutput>(data),
        11 => all::<fleet::TaskResult>(data),
        12 => all::<fleet::Ack>(data),
        13 => all::<fleet::Credential>(data),
        14 => all::<fleet::Refused>(data),
        15 => all::<fleet::StateChange>(data),
        16 => all::<tunnel::Open>(data),
        17 => all::<tunnel::Opened>(data),
        18 => all::<tunnel::Data>(data),
        19 => all::<tunnel::Window>(data),
        20 => all::<tunnel::Close>(data),
        21 => all::<payload::Welcome>(data),
        22 => all::<payload::HeartbeatAck>(data),
        23 => all::<payload::ErrorBody>(data),
        24 => all::<payload::Reconnect>(data),
        25 => all::<payload::Hello>(data),
        26 => all::<payload::SessionEvent>(data),
        27 => all::<payload::HeartbeatBatch>(data),
        28 => all::<payload::RoomRequest>(data),
        29 => all::<command::Signed>(data),
        30 => all::<command::Envelope>(data),
        31 => {
            let map = header_map(data);
            let _ = PushEnvelope::from_headers(&map);
            let _ = UpstreamEnvelope::from_headers(&map);
            let _ = SessionEnvelope::from_headers(&map);
        }
        32 => {
            let map = header_map(data);
            let _ = AckEnvelope::from_headers(&map);
            let _ = DeliveredEnvelope::from_headers(&map);
            let _ = HeartbeatEnvelope::from_headers(&map);
            if AgentClose::is_close(&map) {
                let _ = AgentClose::from_headers(&map);
            }
            let _ = TraceContext::extract(&map);
        }
        33 => {
            let _ = Subject::parse(&text);
            let _ = messages::subject::family(&text);
        }
        34 => {
            let _ = headers::parse_hop(&text);
        }
        35 => {
            let _ = TraceContext::parse_traceparent(&text);
        }
        36 => {
            let _ = fleet::check_config_name(&text);
            let _ = fleet::check_version(&text);
            let _ = fleet::is_sha256_hex(&text);
        }
        37 => {
            if let Ok(out) = messages::compress::inflate(data, 64 * 1024) {
                assert!(out.len() <= 64 * 1024, "inflate went past its bound");
            }
        }
        38 => {
            let _ = tunnel::allowed(&["127.0.0.1:22".to_owned(), "*:9090".to_owned()], &text);
        }
        _ => {
            let mut credit = tunnel::Receive::new(65_536);
            for chunk in data.chunks(2) {
                let n = usize::from(chunk[0]) * 1024;
                if chunk.len() > 1 && chunk[1] % 2 == 0 {
                    let _ = credit.delivered(n);
                } else {
                    let _ = credit.arrived(n);
                }
            }
        }
    }
});
