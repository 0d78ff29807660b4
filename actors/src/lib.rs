//! The event-sourced actor system behind acrpull.
//!
//! - [`spec`] resolves and validates a binding's spec.
//! - [`event`] and [`command`] are the inputs and outputs of the per-binding state machine.
//! - [`state`] folds events into a binding's state, and [`decide`] turns state into commands.
//! - [`refresh`] and [`backoff`] contain the timing rules, and [`status`] builds status and Events.
//! - [`write`](mod@write) describes the writes that only the writer actor performs.
//! - [`ports`] are the boundaries that the binary implements with Azure and Kubernetes.
//! - [`actor`] runs it all on actix, and [`memory`] has in-memory ports for tests and benchmarks.

pub mod actor;
pub mod backoff;
pub mod clock;
pub mod command;
pub mod config;
pub mod decide;
pub mod event;
pub mod journal;
pub mod memory;
pub mod model;
pub mod ports;
pub mod refresh;
pub mod spec;
pub mod state;
pub mod status;
pub mod write;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod properties;

pub use actor::system::{ActorSystem, SystemConfig};
