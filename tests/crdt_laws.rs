//! The G-Counter obeys the CRDT laws, checked against `crdts::GCounter` as the model.

use crdt_rate_limiter::counter::GCounter;
use crdts::{CmRDT, CvRDT};
use num_traits::ToPrimitive;
use proptest::prelude::*;

/// The reference: `crdts::GCounter` for the value and `crdts::VClock` (the same
/// slot-wise-max state, whose slots are readable) for each slot.
#[derive(Clone)]
struct Model {
    counter: crdts::GCounter<u8>,
    slots: crdts::VClock<u8>,
}

impl Model {
    fn merge(&mut self, other: Model) {
        self.counter.merge(other.counter);
        self.slots.merge(other.slots);
    }
}

/// A counter built from increments `(slot, by)`, in ours and in the reference.
fn build(ops: &[(u8, u16)]) -> (GCounter<u8>, Model) {
    let mut ours = GCounter::new();
    let mut model = Model { counter: crdts::GCounter::new(), slots: crdts::VClock::new() };
    for &(slot, by) in ops {
        ours.increment(slot, u64::from(by));
        if by > 0 {
            model.counter.apply(model.counter.inc_many(slot, u64::from(by)));
            let next = model.slots.get(&slot) + u64::from(by);
            model.slots.apply(crdts::Dot::new(slot, next));
        }
    }
    (ours, model)
}

fn ops() -> impl Strategy<Value = Vec<(u8, u16)>> {
    prop::collection::vec((0u8..6, 0u16..40), 0..12)
}

fn same(ours: &GCounter<u8>, model: &Model) {
    assert_eq!(ours.value(), model.counter.read().to_u64().unwrap());
    for slot in 0..6u8 {
        assert_eq!(ours.get(slot), model.slots.get(&slot), "slot {slot}");
    }
}

proptest! {
    #[test]
    fn merge_matches_the_reference_model(a in ops(), b in ops()) {
        let (mut x, mut mx) = build(&a);
        let (y, my) = build(&b);
        same(&x, &mx);
        x.merge(&y);
        mx.merge(my);
        same(&x, &mx);
    }

    #[test]
    fn merge_is_commutative(a in ops(), b in ops()) {
        let (x, _) = build(&a);
        let (y, _) = build(&b);
        let mut xy = x.clone();
        xy.merge(&y);
        let mut yx = y.clone();
        yx.merge(&x);
        prop_assert_eq!(xy, yx);
    }

    #[test]
    fn merge_is_associative(a in ops(), b in ops(), c in ops()) {
        let (x, _) = build(&a);
        let (y, _) = build(&b);
        let (z, _) = build(&c);
        let mut left = x.clone();
        left.merge(&y);
        left.merge(&z);
        let mut yz = y.clone();
        yz.merge(&z);
        let mut right = x.clone();
        right.merge(&yz);
        prop_assert_eq!(left, right);
    }

    #[test]
    fn merge_is_idempotent(a in ops(), b in ops()) {
        let (mut x, _) = build(&a);
        let (y, _) = build(&b);
        x.merge(&y);
        let once = x.clone();
        x.merge(&y);
        x.merge(&once);
        prop_assert_eq!(x, once);
    }

    #[test]
    fn values_never_decrease(a in ops(), merges in prop::collection::vec(ops(), 0..6)) {
        let (mut x, _) = build(&a);
        let mut last = x.value();
        for m in merges {
            let (y, _) = build(&m);
            let slots_before: Vec<_> = x.iter().collect();
            x.merge(&y);
            prop_assert!(x.value() >= last);
            for (slot, count) in slots_before {
                prop_assert!(x.get(slot) >= count);
            }
            last = x.value();
        }
    }
}
