//! The Kubernetes adapter: watches in, writes out.

pub mod names;
pub mod secret;
pub mod watch;
pub mod writer;
