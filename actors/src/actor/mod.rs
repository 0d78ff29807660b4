//! The actix actors.
//!
//! - [`registry::Registry`] addresses bindings by `namespace/name`, starts and stops their
//!   actors, and routes every event to them.
//! - [`binding::BindingActor`] runs one binding's state machine and its timer.
//! - [`broker::TokenBroker`] shares token requests and caches tokens.
//! - [`writer::WriterActor`] is the only writer to the API server.
//! - [`system::ActorSystem`] starts them together and is what the adapters call.
//!
//! All of them must start inside a running actix `System`.

use actix::Message;

use crate::event::BindingEvent;
use crate::model::BindingKey;

pub mod binding;
pub mod broker;
pub mod registry;
pub mod system;
pub mod writer;

/// An event addressed to one binding. The registry routes it; the binding actor handles it.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct Deliver {
    /// The binding the event is for.
    pub key: BindingKey,
    /// What happened.
    pub event: BindingEvent,
}
