//! scheduler: the fleet control plane (agent registry, liveness, tasks, results).
//!
//! - [`store`]: the durable state in one redb file, as a synchronous API.

pub mod store;
