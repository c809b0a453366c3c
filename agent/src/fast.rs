//! Hash maps and sets of the per-event path (tracker, parsers, linking, export encoding): keyed
//! by kernel-given numbers (pids, fds, socket addresses, stream ids), hashed with `foldhash`'s
//! seeded fast hasher instead of SipHash, which took about 4% of the agent's CPU under load.
//! The seed is random per process, so keys chosen from outside (ports) cannot be aimed at
//! one bucket ahead of time.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
