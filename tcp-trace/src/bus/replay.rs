//! Replayed history and the stretches of it the kernel recorded no state changes for.
use std::collections::VecDeque;

use super::Delivery;

/// `replay` (events in seq order, from seq `from` on) with a [`Delivery::Unrecorded`] before the
/// first event of each stretch in `stretches` that it reaches (or at its end, when no event of
/// the stretch passed the filter).
pub(super) fn with_unrecorded(
    replay: VecDeque<Delivery>,
    stretches: &VecDeque<(u64, u64)>,
    from: u64,
) -> VecDeque<Delivery> {
    let marker = |&(first, last): &(u64, u64)| Delivery::Unrecorded {
        first_seq: first.max(from),
        last_seq: last,
    };
    let mut stretches = stretches.iter().filter(|s| s.1 >= from).peekable();
    let mut out = VecDeque::with_capacity(replay.len() + 1);
    for delivery in replay {
        if let Delivery::Event(event) = &delivery {
            while let Some(stretch) = stretches.next_if(|s| s.0.max(from) <= event.seq) {
                out.push_back(marker(stretch));
            }
        }
        out.push_back(delivery);
    }
    out.extend(stretches.map(marker));
    out
}
