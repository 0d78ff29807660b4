//! Test support for acrpull.

pub mod control_plane;
pub mod fake_azure;
pub mod pki;
