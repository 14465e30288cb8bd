//! The agent's handling of what the gateway pushes to it (protocol 12.8): the trust gate
//! (`agent::Gate`: signature, node, route, lifetime, replay, against a real redb
//! outbox) and, for what it admits, the body decoders and checks the agent runs before it
//! acts (the execution policy for commands, probe targets, config names, upgrade
//! manifests, tunnel allowlists). Half the inputs are signed with the pinned key, so the
//! fuzzer reaches the code behind the signature check too. Nothing may panic, a push
//! signed for another node or route is never admitted, and an admitted command id is
//! never admitted twice.
#![no_main]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use agent::{ExecPolicy, Gate, Outbox, check_probe_text};
use libfuzzer_sys::fuzz_target;
use messages::command::{CommandSigner, CommandVerifier, Envelope};
use messages::payload::from_bus;
use messages::{fleet, tunnel};

const NODE: &str = "edge-1";
/// The clock the first input sees; every input moves it on by [`TICK_MS`], so commands
/// the outbox remembered expire and are pruned as they would on an agent. With a fixed
/// clock the replay set only grew, and `remember_command`'s prune (a scan of the set)
/// slowed the target to a few hundred executions a second.
const START: u64 = 1_767_225_600_000;
const TICK_MS: u64 = 10_000;
const ROUTES: [&str; 7] = [
    fleet::down::ACK,
    fleet::down::TASK,
    fleet::down::CANCEL,
    fleet::down::CREDENTIAL,
    fleet::down::CONFIG,
    fleet::down::UPGRADE,
    tunnel::OPEN,
];

struct World {
    signer: CommandSigner,
    gate: Gate,
    outbox: Outbox,
    policy: ExecPolicy,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let signer = CommandSigner::generate();
        let gate = Gate::new(NODE, CommandVerifier::new([signer.verifying_key()]));
        // On tmpfs when there is one: every admitted command is a durable redb write, and
        // an fsync to disk held this target to ~350 executions a second. Durability across
        // a kill is the outbox tests' business (`agent::outbox kill_9_mid_append_...`);
        // here only the gate's decisions matter.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir");
        let outbox = Outbox::open(dir.path().join("outbox.redb")).expect("outbox");
        World {
            signer,
            gate,
            outbox,
            policy: ExecPolicy::with_commands(["echo", "/bin/true"]),
            _dir: dir,
        }
    })
}

/// What the agent checks in an admitted body before acting on it.
fn act(w: &World, route: &str, body: &[u8]) {
    match route {
        fleet::down::TASK => {
            if let Ok(task) = from_bus::<fleet::Task>(body) {
                match &task.spec {
                    fleet::TaskKind::Command { argv, env, cwd } => {
                        let _ = w.policy.prepare(argv, env, cwd.as_deref());
                    }
                    fleet::TaskKind::TcpProbe { target } => {
                        let _ = check_probe_text(target);
                    }
                    fleet::TaskKind::HttpProbe { url } => {
                        let _ = check_probe_text(url);
                    }
                }
                let _ = w.policy.timeout_for(task.timeout_ms);
            }
        }
        fleet::down::CONFIG => {
            if let Ok(push) = from_bus::<fleet::ConfigPush>(body) {
                let _ = fleet::check_config_name(&push.name);
            }
        }
        fleet::down::UPGRADE => {
            if let Ok(m) = from_bus::<fleet::UpgradeManifest>(body) {
                let _ = m.check("linux", "x86_64");
            }
        }
        tunnel::OPEN => {
            if let Ok(open) = from_bus::<tunnel::Open>(body) {
                let _ = tunnel::allowed(&["127.0.0.1:22".to_owned()], &open.remote);
            }
        }
        _ => {
            let _ = from_bus::<fleet::Ack>(body);
            let _ = from_bus::<fleet::Cancel>(body);
            let _ = from_bus::<fleet::Credential>(body);
        }
    }
}

fuzz_target!(|input: &[u8]| {
    static CLOCK: AtomicU64 = AtomicU64::new(START);
    let w = world();
    let Some((&ctl, data)) = input.split_first() else {
        return;
    };
    let now = CLOCK.fetch_add(TICK_MS, Ordering::Relaxed);
    let route = ROUTES[usize::from(ctl & 0x07) % ROUTES.len()];
    let signed_for = ROUTES[usize::from((ctl >> 3) & 0x07) % ROUTES.len()];
    let other_node = ctl & 0x40 != 0;
    let push = if ctl & 0x80 != 0 {
        let envelope = Envelope {
            v: messages::command::VERSION,
            // Fresh per input (the replay rule is checked below, on purpose).
            id: format!("{:016x}", fastrand(data)),
            node: if other_node { "edge-2".to_owned() } else { NODE.to_owned() },
            route: signed_for.to_owned(),
            issued_ms: now,
            expires_ms: now + 60_000,
            body: data.to_vec(),
        };
        match w.signer.sign_envelope(&envelope) {
            Ok(p) => p,
            Err(_) => return,
        }
    } else {
        data.to_vec()
    };
    match w.gate.admit(&w.outbox, route, &push, now) {
        Ok(envelope) => {
            assert_eq!(envelope.node, NODE, "admitted a push signed for another node");
            assert_eq!(envelope.route, route, "admitted a push signed for another route");
            act(w, route, &envelope.body);
            // The same push again: a command that acts is refused as a replay.
            if acts(route) {
                let again = w.gate.admit(&w.outbox, route, &push, now);
                assert!(again.is_err(), "a replayed command was admitted");
            }
        }
        Err(_) => {}
    }
});

fn acts(route: &str) -> bool {
    matches!(
        route,
        fleet::down::TASK
            | fleet::down::CONFIG
            | fleet::down::UPGRADE
            | fleet::down::CANCEL
            | tunnel::OPEN
    )
}

/// A cheap hash of the input, so identical inputs reuse an id (and exercise the replay
/// rule across runs) while different ones do not collide.
fn fastrand(data: &[u8]) -> u64 {
    data.iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}
