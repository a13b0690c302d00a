//! What the subscribers ask of the kernel, told to the agent as it changes: it turns the
//! kernel's record of every transition, and its wake-up pace, on and off with it.
use super::{Bus, State};

/// What the subscribers ask of the kernel now (see [`Bus::on_demand`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    /// Some subscriber is connected.
    pub subscribers: bool,
    /// Some subscriber asks for state-change events.
    pub state_changes: bool,
}

/// Told what the subscribers ask for, whenever it changes.
pub type DemandHook = Box<dyn Fn(Demand) + Send + Sync>;

impl Bus {
    /// Calls `hook` now and whenever the [`Demand`] changes (a first subscriber, the last one
    /// gone; the first to ask for state changes, the last such gone), under the bus lock: when
    /// `subscribe` returns, the hook has been told about the new subscriber. The agent turns the
    /// kernel's record of every transition, and its wake-up pace, on and off with it.
    pub fn on_demand(&self, hook: DemandHook) {
        let state = self.lock();
        hook(state.demand());
        // Set once, by the agent; a second hook is a bug, and is ignored.
        let _ = self.demand_hook.set(hook);
    }

    /// After an (un)subscribe, under the lock: publishes the subscriber count, and tells the
    /// hook if the demand changed.
    pub(super) fn subscribers_changed(&self, state: &State, before: Demand) {
        self.subscribers_now.store(
            state.subscribers.len(),
            std::sync::atomic::Ordering::Release,
        );
        let now = state.demand();
        if now != before
            && let Some(hook) = self.demand_hook.get()
        {
            hook(now);
        }
    }
}

impl State {
    pub(super) fn demand(&self) -> Demand {
        Demand {
            subscribers: !self.subscribers.is_empty(),
            state_changes: self
                .subscribers
                .iter()
                .any(|s| s.filter.asks_for_state_changes()),
        }
    }
}
