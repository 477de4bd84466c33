//! The per-network MAC table: source MAC -> port slot, with aging and a hard bound.
//!
//! Aging is lazy so an idle switch never wakes up: a lookup treats an entry older than
//! the aging time as absent, and expired entries are swept out only when the table is
//! full and a new MAC wants in (at most once a second, so a flood of new MACs into a
//! full table does not turn every frame into a full scan).

use std::collections::HashMap;
use std::time::Duration;

use foldhash::fast::RandomState;

use crate::mac::Mac;

#[derive(Debug, Clone, Copy)]
struct Entry {
    slot: u32,
    seen: Duration,
}

/// What learning one source did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// Known on this port; its time was refreshed.
    Refreshed,
    /// New entry.
    New,
    /// Was on another port (or had expired there) and now points here.
    Moved { from: u32 },
    /// Not learned: the table is full of live entries.
    Full,
}

#[derive(Debug)]
pub struct MacTable {
    /// foldhash, randomly seeded per table: several times cheaper than SipHash on a
    /// 6-byte key, still unpredictable to a guest choosing source MACs.
    map: HashMap<Mac, Entry, RandomState>,
    max: usize,
    aging: Duration,
    last_sweep: Option<Duration>,
}

const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl MacTable {
    pub fn new(max: usize, aging: Duration) -> Self {
        let map = HashMap::with_capacity_and_hasher(max.min(1024), RandomState::default());
        MacTable {
            map,
            max,
            aging,
            last_sweep: None,
        }
    }

    fn live(&self, e: &Entry, now: Duration) -> bool {
        now.saturating_sub(e.seen) < self.aging
    }

    pub fn lookup(&self, mac: &Mac, now: Duration) -> Option<u32> {
        self.map.get(mac).filter(|e| self.live(e, now)).map(|e| e.slot)
    }

    pub fn learn(&mut self, mac: Mac, slot: u32, now: Duration) -> Learned {
        let aging = self.aging;
        if let Some(e) = self.map.get_mut(&mac) {
            let was_live = now.saturating_sub(e.seen) < aging;
            e.seen = now;
            if e.slot == slot {
                return if was_live { Learned::Refreshed } else { Learned::New };
            }
            let from = e.slot;
            e.slot = slot;
            return if was_live {
                Learned::Moved { from }
            } else {
                Learned::New
            };
        }
        if self.map.len() >= self.max {
            let due = self.last_sweep.is_none_or(|t| now.saturating_sub(t) >= SWEEP_INTERVAL);
            if !due {
                return Learned::Full;
            }
            self.sweep(now);
            if self.map.len() >= self.max {
                return Learned::Full;
            }
        }
        self.map.insert(mac, Entry { slot, seen: now });
        Learned::New
    }

    /// Removes expired entries.
    pub fn sweep(&mut self, now: Duration) {
        let aging = self.aging;
        self.map.retain(|_, e| now.saturating_sub(e.seen) < aging);
        self.last_sweep = Some(now);
    }

    /// Forgets every MAC on `slot` (the port went down or away).
    pub fn purge_slot(&mut self, slot: u32) {
        self.map.retain(|_, e| e.slot != slot);
    }

    /// Live entries with their age.
    pub fn entries(&self, now: Duration) -> impl Iterator<Item = (Mac, u32, Duration)> + '_ {
        self.map
            .iter()
            .filter(move |(_, e)| self.live(e, now))
            .map(move |(m, e)| (*m, e.slot, now.saturating_sub(e.seen)))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([0x02, 0, 0, 0, 0, n])
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn learns_moves_and_ages() {
        let mut t = MacTable::new(8, 300 * S);
        assert_eq!(t.learn(mac(1), 0, S), Learned::New);
        assert_eq!(t.learn(mac(1), 0, 2 * S), Learned::Refreshed);
        assert_eq!(t.learn(mac(1), 3, 3 * S), Learned::Moved { from: 0 });
        assert_eq!(t.lookup(&mac(1), 302 * S), Some(3));
        assert_eq!(t.lookup(&mac(1), 303 * S), None, "aged out");
        assert_eq!(
            t.learn(mac(1), 0, 400 * S),
            Learned::New,
            "an expired entry is new again"
        );
    }

    #[test]
    fn bound_holds_until_entries_expire() {
        let mut t = MacTable::new(2, 10 * S);
        assert_eq!(t.learn(mac(1), 0, S), Learned::New);
        assert_eq!(t.learn(mac(2), 0, S), Learned::New);
        assert_eq!(t.learn(mac(3), 0, 2 * S), Learned::Full);
        assert_eq!(
            t.learn(mac(3), 0, 2 * S),
            Learned::Full,
            "no sweep again within a second"
        );
        assert_eq!(t.learn(mac(3), 0, 20 * S), Learned::New, "sweep frees expired entries");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn purge_forgets_a_port() {
        let mut t = MacTable::new(8, 10 * S);
        t.learn(mac(1), 0, S);
        t.learn(mac(2), 1, S);
        t.purge_slot(0);
        assert_eq!(t.lookup(&mac(1), S), None);
        assert_eq!(t.lookup(&mac(2), S), Some(1));
    }
}
