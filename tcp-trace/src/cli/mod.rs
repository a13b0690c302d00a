//! The command line: one binary that is the agent and its clients. [`args`] holds the flags,
//! [`commands`] runs each subcommand, and [`view`] renders the agent's answers as text.
//! Flags -> command -> view, one way; nothing below the CLI imports from here.
pub mod args;
pub mod commands;
pub mod view;

pub use view::events::event_line;
