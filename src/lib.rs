//! The `acrpull` controller: CLI, configuration, and the Kubernetes and Azure adapters around
//! the actor system in `acrpull-actors`.

pub mod azure;
pub mod cli;
pub mod cluster;
pub mod controller;
pub mod crd;
pub mod health;
pub mod leader;
pub mod metrics;
