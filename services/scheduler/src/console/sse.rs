//! The console's live updates, as Server-Sent Events (an `EventSource` in
//! `console.js`; no WebSocket needed for one-way updates, and the browser reconnects by
//! itself):
//!
//! - `/console/tasks/{id}/events`: a task's output as it streams, then results and `end`;
//!   exactly the API's follow stream ([`crate::follow`], `?follow=1`).
//! - `/console/live/fleet`: `event: fleet`, the agent counts by state, every
//!   [`FLEET_PERIOD`].
//! - `/console/live/gateways`: `event: gateways`, the gateway tier's rows, every
//!   [`GATEWAY_PERIOD`].
//!
//! Every stream takes one of the follower slots the API's follow streams use, so the
//! console cannot hold more open streams than [`crate::follow::MAX_FOLLOWERS`]. Streams
//! need a live session (401 without one; they check it again each period, so a logout
//! ends them).

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use serde_json::json;
use servicekit::http::ApiError;

use crate::Shared;
use crate::bus::blocking;
use crate::console::{ConsoleError, session};
use crate::follow::{Slot, event};
use crate::store::{AgentState, LabelSelector};

/// How often the fleet counts are sent.
pub const FLEET_PERIOD: Duration = Duration::from_secs(2);
/// How often the gateway rows are sent.
pub const GATEWAY_PERIOD: Duration = Duration::from_secs(1);

fn session_id(req: &HttpRequest, shared: &Shared) -> Result<String, ConsoleError> {
    let id = session::cookie_value(req).ok_or(ConsoleError::Unauthenticated)?;
    shared
        .console
        .sessions
        .get(&id)
        .ok_or(ConsoleError::Unauthenticated)?;
    Ok(id)
}

/// `GET /console/tasks/{id}/events`
pub async fn task(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    session_id(&req, &shared)?;
    let id: u64 = path
        .parse()
        .map_err(|_| ConsoleError::NotFound(format!("no task {:?}", path.as_str())))?;
    let exists = blocking(&shared, move |store| Ok(store.task(id)?.is_some())).await?;
    if !exists {
        return Err(ConsoleError::NotFound(format!("no task {id}")));
    }
    Ok(crate::http::follow_response(shared.get_ref(), id)?)
}

/// What a live stream sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topic {
    Fleet,
    Gateways,
}

/// One event of `topic`, now.
async fn snapshot(shared: &Arc<Shared>, topic: Topic) -> Option<Bytes> {
    match topic {
        Topic::Gateways => Some(event(
            "gateways",
            &json!(crate::console::pages::gateways::rows(shared)),
        )),
        Topic::Fleet => {
            let counts = blocking(shared, |store| {
                let mut c = [0usize; 3];
                for a in store.agents(&LabelSelector::new(), None)? {
                    c[match a.state {
                        AgentState::Online => 0,
                        AgentState::Degraded => 1,
                        AgentState::Offline => 2,
                    }] += 1;
                }
                Ok(c)
            })
            .await
            .ok()?;
            Some(event(
                "fleet",
                &json!({
                    "online": counts[0],
                    "degraded": counts[1],
                    "offline": counts[2],
                    "total": counts.iter().sum::<usize>(),
                }),
            ))
        }
    }
}

/// `GET /console/live/{topic}`
pub async fn live(
    req: HttpRequest,
    topic: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let id = session_id(&req, &shared)?;
    let (topic, period) = match topic.as_str() {
        "fleet" => (Topic::Fleet, FLEET_PERIOD),
        "gateways" => (Topic::Gateways, GATEWAY_PERIOD),
        other => return Err(ConsoleError::NotFound(format!("no live topic {other:?}"))),
    };
    let shared = Arc::clone(shared.get_ref());
    let slot = Slot::take(&shared).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_followers",
            "too many live streams are open; try again later",
        )
    })?;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = (shared, slot, tick, id);
    let body =
        futures_util::stream::unfold(state, move |(shared, slot, mut tick, id)| async move {
            tick.tick().await;
            // A logout (or expiry) ends the stream.
            shared.console.sessions.is_live(&id).then_some(())?;
            let bytes = snapshot(&shared, topic)
                .await
                .unwrap_or_else(|| Bytes::from_static(b": unavailable\n\n"));
            Some((
                Ok::<_, std::convert::Infallible>(bytes),
                (shared, slot, tick, id),
            ))
        });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}
