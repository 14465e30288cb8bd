//! Console sessions: an API key presented once at login becomes a random 256-bit session
//! id in an `HttpOnly; SameSite=Strict` cookie; the server keeps, in memory, which key (name
//! and scope) each session stands for, its CSRF token and its expiry (12 h at most, 1 h
//! idle). Only a SHA-256 of each id is kept, so the map's lookups reveal nothing about live
//! ids through timing and a heap dump holds no usable cookie. The count is bounded: when
//! full, expired sessions go first, then the longest idle.
//!
//! Also here: the per-IP throttle on failed logins, and the two checks every
//! state-changing request passes (the session's CSRF token in the form, and an `Origin` /
//! `Sec-Fetch-Site` that says the request came from the console's own pages).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use actix_web::http::header;
use rand::RngCore;
use servicekit::http::constant_time_eq;
use sha2::{Digest, Sha256};

use crate::auth::{Actor, Scope};

/// The session cookie's name.
pub const COOKIE: &str = "console_session";
/// Longest a session lives, however busy.
pub const MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// Longest a session lives without a request.
pub const IDLE: Duration = Duration::from_secs(3600);
/// Most sessions kept at once.
pub const MAX_SESSIONS: usize = 10_000;
/// Failed logins one address may make per [`THROTTLE_WINDOW`] before it is refused.
pub const MAX_FAILURES: u32 = 5;
/// The window failed logins are counted in.
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(60);
/// Most addresses the throttle tracks (a bound against address floods).
const MAX_TRACKED: usize = 10_000;

/// What a session stands for.
#[derive(Debug, Clone)]
pub struct Session {
    /// The key's name: the actor of everything done in this session.
    pub key_name: String,
    /// The key's scope: read sessions see everything and change nothing.
    pub scope: Scope,
    /// The token every form of this session carries.
    pub csrf: String,
    created: Instant,
    last_used: Instant,
}

impl Session {
    /// The audit actor of this session.
    pub fn actor(&self) -> Actor {
        Actor {
            name: self.key_name.clone(),
            scope: self.scope,
            trace_id: None,
        }
    }

    /// Whether this session may change anything.
    pub fn can_operate(&self) -> bool {
        self.scope.allows(Scope::Operator)
    }

    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.created) >= MAX_AGE || now.duration_since(self.last_used) >= IDLE
    }
}

/// The live sessions, by the SHA-256 of their id.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
}

/// 32 random bytes as 64 hex digits. `rand`'s thread generator is a CSPRNG seeded from the
/// operating system.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// Starts a session for a key; returns its id (the cookie value) and the session.
    pub fn create(&self, key_name: &str, scope: Scope) -> (String, Session) {
        self.create_at(key_name, scope, Instant::now())
    }

    fn create_at(&self, key_name: &str, scope: Scope, now: Instant) -> (String, Session) {
        let id = random_token();
        let session = Session {
            key_name: key_name.to_owned(),
            scope,
            csrf: random_token(),
            created: now,
            last_used: now,
        };
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= MAX_SESSIONS {
                map.retain(|_, s| !s.expired(now));
            }
            if map.len() >= MAX_SESSIONS
                && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| *k)
            {
                map.remove(&oldest);
            }
            map.insert(digest(&id), session.clone());
        }
        (id, session)
    }

    /// The session `id` names, if it is live; counts as a use.
    pub fn get(&self, id: &str) -> Option<Session> {
        self.get_at(id, Instant::now())
    }

    fn get_at(&self, id: &str, now: Instant) -> Option<Session> {
        let mut map = self.map.lock().ok()?;
        let key = digest(id);
        let session = map.get_mut(&key)?;
        if session.expired(now) {
            map.remove(&key);
            return None;
        }
        session.last_used = now;
        Some(session.clone())
    }

    /// Whether `id` names a live session, without counting as a use (a page left open with
    /// a live stream must not keep its session from going idle).
    pub fn is_live(&self, id: &str) -> bool {
        let now = Instant::now();
        self.map
            .lock()
            .is_ok_and(|map| map.get(&digest(id)).is_some_and(|s| !s.expired(now)))
    }

    /// Ends the session `id` names; whether there was one.
    pub fn remove(&self, id: &str) -> bool {
        self.map
            .lock()
            .is_ok_and(|mut map| map.remove(&digest(id)).is_some())
    }

    /// Live sessions (expired ones may still be counted until touched).
    pub fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    /// Whether there is no session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Failed logins per client address, in fixed windows.
#[derive(Debug, Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Throttle {
    /// Whether `ip` may try to log in now.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allows_at(ip, Instant::now())
    }

    fn allows_at(&self, ip: IpAddr, now: Instant) -> bool {
        let Ok(map) = self.failures.lock() else {
            return false;
        };
        map.get(&ip).is_none_or(|(start, n)| {
            now.duration_since(*start) >= THROTTLE_WINDOW || *n < MAX_FAILURES
        })
    }

    /// Counts a failed login from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        self.failed_at(ip, Instant::now());
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) {
        let Ok(mut map) = self.failures.lock() else {
            return;
        };
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (start, _)| now.duration_since(*start) < THROTTLE_WINDOW);
        }
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            // Still full of live windows: refuse to grow; the address is not tracked.
            return;
        }
        let entry = map.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= THROTTLE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// The session cookie's value in `req`, if any (the first `console_session=` pair of any
/// `Cookie` header).
pub fn cookie_value(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value that starts a session: `HttpOnly; SameSite=Strict; Path=/console`
/// and `Secure` when the scheduler serves TLS (a browser would not send a `Secure` cookie
/// back over plain HTTP).
pub fn set_cookie(id: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/console{secure}")
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn clear_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/console; Max-Age=0{secure}")
}

/// Whether a form's `csrf` field is the session's token.
pub fn csrf_ok(session: &Session, presented: Option<&str>) -> bool {
    presented.is_some_and(|p| constant_time_eq(p.as_bytes(), session.csrf.as_bytes()))
}

/// Whether a state-changing request came from the console's own pages: a browser's
/// `Sec-Fetch-Site`, when sent, must be `same-origin`, and an `Origin`, when sent, must be
/// this server (scheme and host as the request reached it). Requests with neither header
/// (non-browser clients) still need the CSRF token, which only the console's pages carry.
pub fn same_origin(req: &HttpRequest) -> bool {
    let headers = req.headers();
    if let Some(site) = headers.get("sec-fetch-site")
        && site.as_bytes() != b"same-origin"
    {
        return false;
    }
    match headers.get(header::ORIGIN) {
        None => true,
        Some(origin) => {
            let info = req.connection_info();
            let own = format!("{}://{}", info.scheme(), info.host());
            origin.as_bytes() == own.as_bytes()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_when_idle_or_old_and_ids_are_random() {
        let sessions = Sessions::default();
        let t0 = Instant::now();
        let (id, s) = sessions.create_at("ops", Scope::Operator, t0);
        assert_eq!(id.len(), 64);
        assert_eq!(s.csrf.len(), 64);
        assert_ne!(id, s.csrf);
        assert_ne!(id, sessions.create_at("ops", Scope::Operator, t0).0);
        // Used every 50 minutes: alive until the 12 h cap.
        let mut t = t0;
        for _ in 0..14 {
            t += Duration::from_secs(50 * 60);
            assert!(sessions.get_at(&id, t).is_some());
        }
        t += Duration::from_secs(50 * 60);
        assert!(sessions.get_at(&id, t).is_none(), "past 12 h");
        let (idle, _) = sessions.create_at("dash", Scope::Read, t0);
        assert!(sessions.get_at(&idle, t0 + IDLE).is_none(), "idle for 1 h");
        assert!(sessions.get_at("nope", t0).is_none());
    }

    #[test]
    fn logout_removes_the_session() {
        let sessions = Sessions::default();
        let (id, _) = sessions.create("ops", Scope::Operator);
        assert!(sessions.get(&id).is_some());
        assert!(sessions.remove(&id));
        assert!(sessions.get(&id).is_none());
        assert!(!sessions.remove(&id));
    }

    #[test]
    fn failed_logins_are_throttled_per_address_per_window() {
        let throttle = Throttle::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(throttle.allows_at(ip, t0));
            throttle.failed_at(ip, t0);
        }
        assert!(!throttle.allows_at(ip, t0));
        assert!(throttle.allows_at(other, t0));
        assert!(throttle.allows_at(ip, t0 + THROTTLE_WINDOW));
    }

    #[test]
    fn cookies_carry_the_attributes() {
        let c = set_cookie("abc", false);
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
        assert!(c.contains("Path=/console") && !c.contains("Secure"), "{c}");
        assert!(set_cookie("abc", true).ends_with("; Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let req = actix_web::test::TestRequest::get()
            .insert_header(("cookie", "a=1; console_session=abc ; b=2"))
            .to_http_request();
        assert_eq!(cookie_value(&req).as_deref(), Some("abc"));
        let none = actix_web::test::TestRequest::get()
            .insert_header(("cookie", "console_session=; x=y"))
            .to_http_request();
        assert_eq!(cookie_value(&none), None);
    }

    #[test]
    fn origin_checks() {
        let req = |headers: &[(&str, &str)]| {
            let mut r = actix_web::test::TestRequest::post()
                .uri("/console/tasks")
                .insert_header(("host", "sched.example:8080"));
            for (k, v) in headers {
                r = r.insert_header((*k, *v));
            }
            r.to_http_request()
        };
        assert!(same_origin(&req(&[])));
        assert!(same_origin(&req(&[(
            "origin",
            "http://sched.example:8080"
        )])));
        assert!(same_origin(&req(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&req(&[("origin", "http://evil.example")])));
        assert!(!same_origin(&req(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&req(&[("sec-fetch-site", "same-site")])));
    }
}
