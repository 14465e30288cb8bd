//! `GET /v1/agents/{id}/tunnel?remote=host:port`: a TCP tunnel to a port on an agent's
//! machine, as a WebSocket whose binary messages are the stream's bytes (what
//! `schedctl tunnel` bridges each accepted local connection to).
//!
//! The request needs an operator key (a `GET`, but it reaches into a machine). Before the
//! upgrade the scheduler pushes the signed open and waits for the agent's answer, so a
//! refusal (port not on the agent's allowlist, caps, dial failure) is an ordinary HTTP
//! error the operator can read, not a WebSocket that closes at once. After the upgrade the
//! bridge moves bytes within the agent's credit window one way and grants credit the other
//! way only as the operator's socket takes the bytes: a slow operator slows its own stream
//! and nothing else. Opens (and refusals) and closes are audited.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use messages::tunnel::{self, CloseReason, Credit, Receive};
use serde::Deserialize;
use serde_json::json;
use servicekit::http::ApiError;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{authorize, node_id};
use crate::Shared;
use crate::audit;
use crate::auth::{Actor, Scope};
use crate::bus::{self, blocking, is_up};
use crate::tunnel::{Registration, Up};

/// How long the agent gets to answer an open (dialling included).
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// Registers the route.
pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/agents/{id}/tunnel", web::get().to(open));
}

#[derive(Debug, Deserialize)]
struct TunnelQuery {
    remote: String,
}

fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && host.len() <= 255
            && host.bytes().all(|b| b.is_ascii_graphic())
            && port.parse::<u16>().is_ok_and(|p| p > 0)
    })
}

fn is_websocket(req: &HttpRequest) -> bool {
    req.headers()
        .get(actix_web::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn open(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<TunnelQuery>,
    body: web::Payload,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    if !actor.scope.allows(Scope::Operator) {
        tracing::warn!(actor = %actor.name, "A read-only API key was refused a tunnel.");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "API key {:?} has scope {}; a tunnel needs scope operator",
                actor.name,
                actor.scope.as_str()
            ),
        ));
    }
    let node = node_id(&path)?;
    let remote = query.remote.trim().to_owned();
    if !is_host_port(&remote) {
        return Err(ApiError::bad(
            "bad_remote",
            format!("remote {remote:?} must be host:port"),
        ));
    }
    if !is_websocket(&req) {
        return Err(ApiError::bad(
            "websocket_required",
            "a tunnel is a WebSocket: send Upgrade: websocket",
        ));
    }
    let n = node.clone();
    let record = blocking(&shared, move |store| store.agent(&n)).await?;
    match record {
        None => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no agent {node}"),
            ));
        }
        Some(r) if !is_up(r.state) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "agent_offline",
                format!("agent {node} is offline"),
            ));
        }
        Some(_) => {}
    }
    let shared: Arc<Shared> = Arc::clone(&shared);
    let (reg, mut rx) = crate::tunnel::register(&shared, &node, &actor.name).map_err(|e| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_tunnels",
            e.to_string(),
        )
    })?;
    let idle_ms = u64::try_from(shared.config.tunnel_idle.as_millis()).unwrap_or(u64::MAX);
    let open = tunnel::Open {
        stream: reg.stream,
        token: reg.token.clone(),
        remote: remote.clone(),
        window: tunnel::DEFAULT_WINDOW,
        idle_timeout_ms: idle_ms,
        actor: actor.name.clone(),
    };
    bus::push(&shared, &node, tunnel::OPEN, &open, None).await?;
    let answer = tokio::time::timeout(OPEN_TIMEOUT, rx.recv()).await;
    let refused = |status: StatusCode, code: &'static str, reason: &str, detail: String| {
        (status, code, reason.to_owned(), detail)
    };
    let window = match answer {
        Ok(Some(Up::Opened(window))) => Ok(window),
        Ok(Some(Up::Close(reason, detail))) => Err(match reason {
            CloseReason::NotAllowed => refused(
                StatusCode::FORBIDDEN,
                "tunnel_not_allowed",
                reason.as_str(),
                format!("agent {node} refused: {detail}"),
            ),
            CloseReason::TooMany => refused(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_tunnels",
                reason.as_str(),
                format!("agent {node} refused: {detail}"),
            ),
            _ => refused(
                StatusCode::BAD_GATEWAY,
                "tunnel_failed",
                reason.as_str(),
                format!("agent {node}: {detail}"),
            ),
        }),
        Ok(Some(_) | None) => Err(refused(
            StatusCode::BAD_GATEWAY,
            "tunnel_failed",
            "reset",
            "the agent answered out of order".into(),
        )),
        Err(_) => {
            // It may still open late: tell it the stream is gone.
            close_agent_end(&shared, &reg, CloseReason::Gone, "no answer in time").await;
            Err(refused(
                StatusCode::GATEWAY_TIMEOUT,
                "tunnel_timeout",
                "timeout",
                format!("agent {node} did not answer within {OPEN_TIMEOUT:?}"),
            ))
        }
    };
    let target = format!("agent/{node}");
    match window {
        Err((status, code, reason, detail)) => {
            audit::record(
                &shared,
                &actor,
                audit::TUNNEL_OPEN,
                target,
                json!({"stream": reg.stream, "remote": remote, "outcome": "refused", "reason": reason, "detail": detail}),
            )
            .await?;
            Err(ApiError::new(status, code, detail))
        }
        Ok(window) => {
            let upgraded = actix_ws::handle(&req, body);
            let (response, session, msgs) = match upgraded {
                Ok(parts) => parts,
                Err(e) => {
                    close_agent_end(&shared, &reg, CloseReason::Gone, "handshake failed").await;
                    return Err(ApiError::bad("websocket_required", e.to_string()));
                }
            };
            audit::record(
                &shared,
                &actor,
                audit::TUNNEL_OPEN,
                target,
                json!({"stream": reg.stream, "remote": remote, "outcome": "opened"}),
            )
            .await?;
            let bridge = Bridge {
                shared,
                actor,
                reg,
                remote,
                window,
            };
            actix_web::rt::spawn(bridge.run(rx, session, msgs.max_frame_size(256 * 1024)));
            Ok(response)
        }
    }
}

async fn close_agent_end(shared: &Shared, reg: &Registration, reason: CloseReason, detail: &str) {
    let close = tunnel::Close {
        stream: reg.stream,
        token: reg.token.clone(),
        reason,
        detail: detail.to_owned(),
    };
    if let Err(e) = bus::push_unsigned(shared, &reg.node, tunnel::CLOSE, &close).await {
        tracing::warn!(stream = reg.stream, error = %e, "Cannot tell the agent a tunnel closed.");
    }
}

/// One open stream between an operator's WebSocket and the agent.
struct Bridge {
    shared: Arc<Shared>,
    actor: Actor,
    reg: Registration,
    remote: String,
    window: u32,
}

/// How a bridge ended: why, and whether the agent still has to be told.
struct Ending {
    reason: CloseReason,
    detail: String,
    tell_agent: bool,
}

impl Ending {
    fn new(reason: CloseReason, detail: impl Into<String>, tell_agent: bool) -> Self {
        Ending {
            reason,
            detail: detail.into(),
            tell_agent,
        }
    }
}

impl Bridge {
    async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<Up>,
        mut session: actix_ws::Session,
        mut msgs: actix_ws::MessageStream,
    ) {
        let started = Instant::now();
        let mut credit = Credit::new(self.window);
        let mut window = Receive::new(tunnel::DEFAULT_WINDOW);
        let (mut seq_down, mut seq_up) = (0u64, 0u64);
        let (mut bytes_down, mut bytes_up) = (0u64, 0u64);
        // Operator bytes waiting for credit, and how many of them were sent.
        let mut pending: Option<(Bytes, usize)> = None;
        let idle = self.shared.config.tunnel_idle;
        let mut deadline = Instant::now() + idle;
        let ending = 'bridge: loop {
            while let Some((buf, sent)) = pending.as_mut() {
                let n = credit.take(buf.len() - *sent);
                if n == 0 {
                    break;
                }
                let data = tunnel::Data {
                    stream: self.reg.stream,
                    token: self.reg.token.clone(),
                    seq: seq_down,
                    data: buf[*sent..*sent + n].to_vec(),
                };
                if let Err(e) =
                    bus::push_unsigned(&self.shared, &self.reg.node, tunnel::DATA, &data).await
                {
                    break 'bridge Ending::new(CloseReason::Reset, e.to_string(), true);
                }
                seq_down += 1;
                bytes_down += n as u64;
                *sent += n;
                if *sent >= buf.len() {
                    pending = None;
                }
            }
            tokio::select! {
                msg = msgs.recv(), if pending.is_none() => match msg {
                    Some(Ok(actix_ws::Message::Binary(b))) => {
                        if !b.is_empty() {
                            pending = Some((b, 0));
                        }
                        deadline = Instant::now() + idle;
                    }
                    Some(Ok(actix_ws::Message::Ping(p))) => {
                        let _ = session.pong(&p).await;
                    }
                    Some(Ok(actix_ws::Message::Close(_))) | None => {
                        break Ending::new(CloseReason::Closed, "the operator closed", true);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Ending::new(CloseReason::Reset, format!("operator socket: {e}"), true),
                },
                up = rx.recv() => match up {
                    Some(Up::Data(d)) => {
                        if d.seq != seq_up {
                            break Ending::new(CloseReason::Reset, format!("chunk {} where {seq_up} was due", d.seq), true);
                        }
                        seq_up += 1;
                        let len = d.data.len();
                        if let Err(e) = window.arrived(len) {
                            break Ending::new(CloseReason::Reset, e.to_string(), true);
                        }
                        // Waits while the operator's socket is full: no grant goes out, and
                        // the agent stops reading the remote.
                        if session.binary(d.data).await.is_err() {
                            break Ending::new(CloseReason::Gone, "the operator's connection went away", true);
                        }
                        bytes_up += len as u64;
                        if let Some(grant) = window.delivered(len) {
                            let w = tunnel::Window { stream: self.reg.stream, token: self.reg.token.clone(), grant };
                            if let Err(e) = bus::push_unsigned(&self.shared, &self.reg.node, tunnel::WINDOW, &w).await {
                                break Ending::new(CloseReason::Reset, e.to_string(), true);
                            }
                        }
                        deadline = Instant::now() + idle;
                    }
                    Some(Up::Window(grant)) => {
                        if let Err(e) = credit.grant(grant) {
                            break Ending::new(CloseReason::Reset, e.to_string(), true);
                        }
                    }
                    Some(Up::Close(reason, detail)) => break Ending::new(reason, detail, false),
                    Some(Up::Opened(_)) => {}
                    None => break Ending::new(CloseReason::Gone, "stream forgotten", false),
                },
                () = tokio::time::sleep_until(deadline) => {
                    break Ending::new(CloseReason::Idle, format!("no data for {} s", idle.as_secs()), true);
                }
            }
        };
        if ending.tell_agent {
            close_agent_end(&self.shared, &self.reg, ending.reason, &ending.detail).await;
        }
        let code = match ending.reason {
            CloseReason::Closed => actix_ws::CloseCode::Normal,
            CloseReason::Idle => actix_ws::CloseCode::Away,
            _ => actix_ws::CloseCode::Error,
        };
        let description = format!("{}: {}", ending.reason.as_str(), ending.detail);
        let _ = session
            .close(Some(actix_ws::CloseReason {
                code,
                description: Some(description.chars().take(120).collect()),
            }))
            .await;
        let detail = json!({
            "stream": self.reg.stream,
            "remote": self.remote,
            "reason": ending.reason.as_str(),
            "detail": ending.detail,
            "bytes_to_agent": bytes_down,
            "bytes_from_agent": bytes_up,
            "duration_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
        let target = format!("agent/{}", self.reg.node);
        if let Err(e) = audit::record(
            &self.shared,
            &self.actor,
            audit::TUNNEL_CLOSE,
            target,
            detail,
        )
        .await
        {
            tracing::error!(error = %e, "Cannot audit a tunnel close.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_host_port;

    #[test]
    fn remotes_are_host_and_port() {
        assert!(is_host_port("127.0.0.1:22"));
        assert!(is_host_port("[::1]:22"));
        assert!(is_host_port("db.internal:5432"));
        for bad in ["", "host", ":22", "h:0", "h:99999", "a b:1"] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }
}
