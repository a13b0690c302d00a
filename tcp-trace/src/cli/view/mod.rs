//! One renderer per view, each a pure function (or, for `top`, a small state) from the agent's
//! answer to text; what they share is formatted in [`format`].
pub mod conns;
pub mod events;
pub mod format;
pub mod stats;
pub mod top;
