//! Integration tests of the `acrpull` binary against a real kube-apiserver,
//! kube-controller-manager and etcd, with Azure faked on loopback.
//!
//! Each test runs its own operator process, which serves only the bindings labelled for that
//! test in the test's own namespace. The control plane is shared by the whole binary.

mod faults;
mod leader;
mod lifecycle;
mod manifests;
mod support;
