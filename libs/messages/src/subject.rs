//! NATS subjects: every subject any service publishes or subscribes to is built and parsed
//! here, so the bus layout is written down once.
//!
//! ```text
//! ws.msg.<kind>.<route...>     gateway -> services: a client's publish frame (queue groups)
//! ws.evt.<kind>.<event>        gateway -> services: connect, disconnect, heartbeat batch,
//!                              join/leave requests, push receipts (queue groups)
//! ws.user.<user>               services -> gateways holding one of the user's app sockets
//! ws.agent.<node>              scheduler -> gateways holding the node's agent socket (only
//!                              the scheduler's credential may publish here)
//! ws.room.<room...>            services -> gateways holding a member of the room
//! ws.gw.<gateway>.push         services -> one gateway, addressed to socket ids in a header
//! ws.gw.<gateway>.ctl          services -> one gateway: join/leave a room, kick, replies
//! ws.gw.<gateway>.probe        a gateway -> itself: proves its server processed its SUBs
//! ws.lp.<worker>               a gateway -> the gateway holding worker id <worker>: long-poll
//!                              requests that reached the wrong replica (request/reply)
//! ws.stats.<gateway>           a gateway -> the scheduler's operator console: its counters
//!                              every few seconds ([`crate::payload::GatewayStats`])
//! ws.all                       services -> every gateway, every socket (broadcast)
//! ws.ctl                       services -> every gateway: control (resync)
//! app.<route...>               ws-api -> product services: clients' publish frames, body
//!                              and headers as the gateway sent them
//! wsh.user.<user>              ws-api -> the history stream (WS_HISTORY): a user push
//!                              kept in history; the stream republishes it on ws.user.<user>
//! wsh.room.<room...>           ws-api -> the history stream: a room push kept in history;
//!                              republished on ws.room.<room...>
//! ```
//!
//! `<kind>` is `app` or `agent`: app traffic is consumed by ws-api, agent traffic by the
//! scheduler. Agents never receive user, room, broadcast or socket-addressed pushes: their
//! one downstream subject is `ws.agent.<node>`, a separate channel that NATS permissions
//! reserve for the scheduler (see `docs/security.md`). Gateways subscribe to user and room subjects only while they hold a
//! recipient, so NATS interest routing delivers each push only where it is needed.

use std::fmt;

use crate::frame::Route;
use crate::ids::{ClientKind, GatewayId, IdError, RoomId, UserId};

/// First token of every subject this system uses.
pub const ROOT: &str = "ws";
/// First token of the subjects product services consume.
pub const APP_ROOT: &str = "app";

/// First token of the subjects history-kept pushes are appended to (ADR 0017).
pub const HISTORY_ROOT: &str = "wsh";
/// The JetStream stream that keeps history-kept pushes.
pub const HISTORY_STREAM: &str = "WS_HISTORY";
/// The subjects [`HISTORY_STREAM`] captures.
pub const HISTORY_SUBJECTS: [&str; 2] = ["wsh.user.*", "wsh.room.>"];
/// The stream republishes every stored message from `wsh.<rest>` to `ws.<rest>`: live
/// delivery in the stream's order, and only of messages it accepted.
pub const HISTORY_REPUBLISH: (&str, &str) = ("wsh.>", "ws.>");

/// `wsh.user.<user>`: where ws-api appends a user push kept in history.
pub fn history_user(user: &UserId) -> String {
    format!("{HISTORY_ROOT}.user.{user}")
}

/// `wsh.room.<room>`: where ws-api appends a room push kept in history.
pub fn history_room(room: &RoomId) -> String {
    format!("{HISTORY_ROOT}.room.{room}")
}

/// Queue group ws-api replicas share for app traffic and events.
pub const QUEUE_WS_API: &str = "ws-api";
/// Queue group scheduler instances share for agent traffic and events.
pub const QUEUE_SCHEDULER: &str = "scheduler";

/// Lifecycle and session events a gateway emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// A socket was accepted.
    Connect,
    /// A socket closed.
    Disconnect,
    /// A periodic batch of last-seen times for the gateway's sockets.
    Heartbeat,
    /// A client asked to join a room (the services decide).
    Join,
    /// A client asked to leave a room.
    Leave,
    /// A client acknowledged a push (delivery receipt).
    Ack,
    /// A gateway handed a push that asked for a receipt to its local recipients
    /// (`ws-msg-id` names the push, `ws-count` how many sockets).
    Delivered,
}

impl Event {
    /// Every event.
    pub const ALL: [Event; 7] = [
        Event::Connect,
        Event::Disconnect,
        Event::Heartbeat,
        Event::Join,
        Event::Leave,
        Event::Ack,
        Event::Delivered,
    ];

    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Connect => "connect",
            Event::Disconnect => "disconnect",
            Event::Heartbeat => "heartbeat",
            Event::Join => "join",
            Event::Leave => "leave",
            Event::Ack => "ack",
            Event::Delivered => "delivered",
        }
    }

    fn parse(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == token)
    }
}

/// A parsed subject of this system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// `ws.msg.<kind>.<route>`
    Upstream {
        /// Client kind.
        kind: ClientKind,
        /// Route from the publish frame (non-empty).
        route: Route,
    },
    /// `ws.evt.<kind>.<event>`
    Event {
        /// Client kind.
        kind: ClientKind,
        /// Which event.
        event: Event,
    },
    /// `ws.user.<user>`
    User(UserId),
    /// `ws.agent.<node>`
    Agent(UserId),
    /// `ws.room.<room>`
    Room(RoomId),
    /// `ws.gw.<gateway>.push`
    GatewayPush(GatewayId),
    /// `ws.gw.<gateway>.ctl`
    GatewayControl(GatewayId),
    /// `ws.gw.<gateway>.probe`
    GatewayProbe(GatewayId),
    /// `ws.all`
    Broadcast,
    /// `ws.ctl`
    ControlAll,
    /// `app.<route>`
    Application(Route),
}

/// Why a string is not one of this system's subjects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// Does not start with `ws.` or has an unknown second token.
    #[error("not a subject of this system")]
    Foreign,
    /// Right prefix, wrong shape.
    #[error("malformed subject")]
    Malformed,
    /// An embedded id is invalid.
    #[error("invalid id in subject: {0}")]
    Id(#[from] IdError),
}

impl Subject {
    /// Parses a concrete subject (no wildcards).
    pub fn parse(subject: &str) -> Result<Subject, SubjectError> {
        if let Some(route) = subject.strip_prefix("app.") {
            let route = Route::new(route).map_err(|_| SubjectError::Malformed)?;
            if route.is_empty() {
                return Err(SubjectError::Malformed);
            }
            return Ok(Subject::Application(route));
        }
        let rest = subject.strip_prefix("ws.").ok_or(SubjectError::Foreign)?;
        if rest == "all" {
            return Ok(Subject::Broadcast);
        }
        if rest == "ctl" {
            return Ok(Subject::ControlAll);
        }
        let (head, tail) = rest.split_once('.').ok_or(SubjectError::Foreign)?;
        match head {
            "msg" => {
                let (kind, route) = tail.split_once('.').ok_or(SubjectError::Malformed)?;
                let kind = kind.parse()?;
                let route = Route::new(route).map_err(|_| SubjectError::Malformed)?;
                if route.is_empty() {
                    return Err(SubjectError::Malformed);
                }
                Ok(Subject::Upstream { kind, route })
            }
            "evt" => {
                let (kind, event) = tail.split_once('.').ok_or(SubjectError::Malformed)?;
                let kind = kind.parse()?;
                let event = Event::parse(event).ok_or(SubjectError::Malformed)?;
                Ok(Subject::Event { kind, event })
            }
            "user" => Ok(Subject::User(UserId::new(tail)?)),
            "agent" => Ok(Subject::Agent(UserId::new(tail)?)),
            "room" => Ok(Subject::Room(RoomId::new(tail)?)),
            "gw" => {
                let (gw, op) = tail.split_once('.').ok_or(SubjectError::Malformed)?;
                let gw = GatewayId::new(gw)?;
                match op {
                    "push" => Ok(Subject::GatewayPush(gw)),
                    "ctl" => Ok(Subject::GatewayControl(gw)),
                    "probe" => Ok(Subject::GatewayProbe(gw)),
                    _ => Err(SubjectError::Malformed),
                }
            }
            _ => Err(SubjectError::Foreign),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Upstream { kind, route } => write!(f, "{ROOT}.msg.{kind}.{route}"),
            Subject::Event { kind, event } => write!(f, "{ROOT}.evt.{kind}.{}", event.as_str()),
            Subject::User(user) => write!(f, "{ROOT}.user.{user}"),
            Subject::Agent(node) => write!(f, "{ROOT}.agent.{node}"),
            Subject::Room(room) => write!(f, "{ROOT}.room.{room}"),
            Subject::GatewayPush(gw) => write!(f, "{ROOT}.gw.{gw}.push"),
            Subject::GatewayControl(gw) => write!(f, "{ROOT}.gw.{gw}.ctl"),
            Subject::GatewayProbe(gw) => write!(f, "{ROOT}.gw.{gw}.probe"),
            Subject::Broadcast => write!(f, "{ROOT}.all"),
            Subject::ControlAll => write!(f, "{ROOT}.ctl"),
            Subject::Application(route) => write!(f, "{APP_ROOT}.{route}"),
        }
    }
}

/// The low-cardinality name of a concrete subject, for span names and metric labels: user,
/// room and gateway ids are dropped (`ws.user`, `ws.room`, `ws.gw.push`, `ws.gw.ctl`);
/// every other subject is its own family.
pub fn family(subject: &str) -> &str {
    if subject.starts_with("ws.user.") {
        "ws.user"
    } else if subject.starts_with("ws.agent.") {
        "ws.agent"
    } else if subject.starts_with("ws.room.") {
        "ws.room"
    } else if subject.starts_with("ws.gw.") {
        if subject.ends_with(".ctl") {
            "ws.gw.ctl"
        } else {
            "ws.gw.push"
        }
    } else {
        subject
    }
}

/// `ws.msg.<kind>.<route>`: where a publish frame goes. `None` for an empty route, which a
/// publish frame must not have.
pub fn upstream(kind: ClientKind, route: &Route) -> Option<String> {
    (!route.is_empty()).then(|| format!("{ROOT}.msg.{kind}.{route}"))
}

/// `ws.msg.<kind>.>`: everything clients of `kind` publish.
pub fn upstream_wildcard(kind: ClientKind) -> String {
    format!("{ROOT}.msg.{kind}.>")
}

/// `ws.evt.<kind>.<event>`
pub fn event(kind: ClientKind, event: Event) -> String {
    Subject::Event { kind, event }.to_string()
}

/// `ws.evt.<kind>.*`: every event about clients of `kind`.
pub fn event_wildcard(kind: ClientKind) -> String {
    format!("{ROOT}.evt.{kind}.*")
}

/// `ws.user.<user>`
pub fn user(user: &UserId) -> String {
    format!("{ROOT}.user.{user}")
}

/// `ws.agent.<node>`: the scheduler's channel to one agent.
pub fn agent(node: &UserId) -> String {
    format!("{ROOT}.agent.{node}")
}

/// `ws.room.<room>`
pub fn room(room: &RoomId) -> String {
    format!("{ROOT}.room.{room}")
}

/// `ws.gw.<gateway>.push`
pub fn gateway_push(gateway: &GatewayId) -> String {
    format!("{ROOT}.gw.{gateway}.push")
}

/// `ws.gw.<gateway>.ctl`
pub fn gateway_control(gateway: &GatewayId) -> String {
    format!("{ROOT}.gw.{gateway}.ctl")
}

/// `ws.gw.<gateway>.probe`: a gateway publishes here and reads its own messages back; the
/// echo proves its server has processed every subscription it sent before the probe.
pub fn gateway_probe(gateway: &GatewayId) -> String {
    format!("{ROOT}.gw.{gateway}.probe")
}

/// `app.<route>`: where ws-api forwards a client's publish for product services.
pub fn application(route: &Route) -> Option<String> {
    (!route.is_empty()).then(|| format!("{APP_ROOT}.{route}"))
}

/// `ws.lp.<worker>`: long-poll requests forwarded to the replica whose leased worker id
/// minted the session's socket id (request/reply; docs/protocol.md section 1.4).
pub fn longpoll_forward(worker: u16) -> String {
    format!("{ROOT}.lp.{worker}")
}

/// `ws.stats.<gateway>`: a gateway's periodic [`crate::payload::GatewayStats`], read by
/// the scheduler's operator console (docs/protocol.md section 8).
pub fn gateway_stats(gateway: &GatewayId) -> String {
    format!("{ROOT}.stats.{gateway}")
}

/// `ws.stats.*`: every gateway's stats.
pub fn gateway_stats_wildcard() -> &'static str {
    "ws.stats.*"
}

/// `ws.all`
pub fn broadcast() -> &'static str {
    "ws.all"
}

/// `ws.ctl`
pub fn control_all() -> &'static str {
    "ws.ctl"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_examples() -> Vec<Subject> {
        let mut out = vec![];
        for kind in ClientKind::ALL {
            out.push(Subject::Upstream {
                kind,
                route: Route::new("chat.send").unwrap(),
            });
            for event in Event::ALL {
                out.push(Subject::Event { kind, event });
            }
        }
        out.push(Subject::User(UserId::new("user:42@tenant").unwrap()));
        out.push(Subject::Agent(UserId::new("edge-1").unwrap()));
        out.push(Subject::Room(RoomId::new("chat.lobby").unwrap()));
        out.push(Subject::GatewayPush(GatewayId::new("gw-1").unwrap()));
        out.push(Subject::GatewayControl(GatewayId::new("gw-1").unwrap()));
        out.push(Subject::GatewayProbe(GatewayId::new("gw-1").unwrap()));
        out.push(Subject::Broadcast);
        out.push(Subject::ControlAll);
        out.push(Subject::Application(Route::new("orders.create").unwrap()));
        out
    }

    /// An exhaustive match: adding a variant fails to compile here until it is numbered,
    /// and the test below then fails until `ALL` lists it.
    fn ordinal(e: Event) -> usize {
        match e {
            Event::Connect => 0,
            Event::Disconnect => 1,
            Event::Heartbeat => 2,
            Event::Join => 3,
            Event::Leave => 4,
            Event::Ack => 5,
            Event::Delivered => 6,
        }
    }

    #[test]
    fn all_lists_every_event_once() {
        for (i, e) in Event::ALL.into_iter().enumerate() {
            assert_eq!(ordinal(e), i);
        }
        assert_eq!(Event::ALL.len(), ordinal(Event::Delivered) + 1);
    }

    #[test]
    fn every_subject_round_trips() {
        for subject in all_examples() {
            let text = subject.to_string();
            assert_eq!(Subject::parse(&text).unwrap(), subject, "{text}");
        }
    }

    #[test]
    fn builders_agree_with_display() {
        let alice = UserId::new("alice").unwrap();
        let lobby = RoomId::new("lobby").unwrap();
        let gw = GatewayId::new("gw-2").unwrap();
        let route = Route::new("orders.new").unwrap();
        assert_eq!(
            upstream(ClientKind::App, &route).unwrap(),
            "ws.msg.app.orders.new"
        );
        assert_eq!(upstream(ClientKind::App, &Route::empty()), None);
        assert_eq!(
            event(ClientKind::Agent, Event::Connect),
            "ws.evt.agent.connect"
        );
        assert_eq!(user(&alice), Subject::User(alice.clone()).to_string());
        assert_eq!(agent(&alice), Subject::Agent(alice.clone()).to_string());
        assert_eq!(room(&lobby), "ws.room.lobby");
        assert_eq!(gateway_push(&gw), "ws.gw.gw-2.push");
        assert_eq!(gateway_control(&gw), "ws.gw.gw-2.ctl");
        assert_eq!(gateway_probe(&gw), "ws.gw.gw-2.probe");
        assert_eq!(gateway_stats(&gw), "ws.stats.gw-2");
        assert!(gateway_stats_wildcard().ends_with(".*"));
        assert!(gateway_stats(&gw).starts_with(gateway_stats_wildcard().trim_end_matches('*')));
        assert_eq!(Subject::parse(broadcast()).unwrap(), Subject::Broadcast);
        assert_eq!(Subject::parse(control_all()).unwrap(), Subject::ControlAll);
        assert_eq!(upstream_wildcard(ClientKind::Agent), "ws.msg.agent.>");
        assert_eq!(application(&route).unwrap(), "app.orders.new");
        assert_eq!(application(&Route::empty()), None);
        assert_eq!(event_wildcard(ClientKind::App), "ws.evt.app.*");
    }

    #[test]
    fn foreign_and_malformed_subjects_are_told_apart() {
        assert_eq!(Subject::parse("other.orders"), Err(SubjectError::Foreign));
        assert_eq!(Subject::parse("app."), Err(SubjectError::Malformed));
        assert_eq!(Subject::parse("ws.nope.x"), Err(SubjectError::Foreign));
        assert_eq!(Subject::parse("ws"), Err(SubjectError::Foreign));
        assert_eq!(Subject::parse("ws.msg.app"), Err(SubjectError::Malformed));
        assert_eq!(
            Subject::parse("ws.evt.app.explode"),
            Err(SubjectError::Malformed)
        );
        assert_eq!(
            Subject::parse("ws.gw.gw-1.other"),
            Err(SubjectError::Malformed)
        );
        assert!(matches!(
            Subject::parse("ws.msg.robot.x"),
            Err(SubjectError::Id(_))
        ));
        assert!(matches!(
            Subject::parse("ws.user.a.b"),
            Err(SubjectError::Id(_))
        ));
        assert!(matches!(
            Subject::parse("ws.user.*"),
            Err(SubjectError::Id(_))
        ));
    }

    #[test]
    fn family_drops_ids() {
        assert_eq!(family("ws.user.alice"), "ws.user");
        assert_eq!(family("ws.room.lobby.1"), "ws.room");
        assert_eq!(family("ws.gw.gw-1.push"), "ws.gw.push");
        assert_eq!(family("ws.gw.gw-1.ctl"), "ws.gw.ctl");
        assert_eq!(family("ws.msg.app.chat.send"), "ws.msg.app.chat.send");
        assert_eq!(family("ws.all"), "ws.all");
    }
}
