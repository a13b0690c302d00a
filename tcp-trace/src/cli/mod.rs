//! The command line: one binary that is the agent and its clients. [`args`] holds the flags and
//! [`view`] renders the agent's answers as text.
pub mod args;
pub mod view;

pub use view::events::event_line;
