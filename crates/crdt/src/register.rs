//! The one mechanism behind presence, typing and read markers: a map of registers that only
//! ever take a value greater than the one they hold (last-writer-wins, or max), so that merge is
//! a pointwise maximum and commutative, associative and idempotent.

use std::collections::BTreeMap;

/// Put `value` under `key` if no value is held or `greater(value, held)`; returns whether it
/// was put.
pub(crate) fn keep_greater<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    key: K,
    value: V,
    greater: impl Fn(&V, &V) -> bool,
) -> bool {
    match map.get_mut(&key) {
        Some(held) if !greater(&value, held) => false,
        Some(held) => {
            *held = value;
            true
        }
        None => {
            map.insert(key, value);
            true
        }
    }
}
