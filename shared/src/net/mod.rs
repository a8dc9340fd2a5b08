//! Outbound network rules shared by every worker that calls a URL a job named: one policy for
//! what may be reached ([`outbound`]) and one signature for what is sent ([`signing`]). Nothing
//! here knows which worker or setting it serves; callers pass their setting names in.

pub mod outbound;
pub mod signing;

pub use outbound::{Checked, OutboundError, OutboundPolicy, Redirects, SettingNames};
