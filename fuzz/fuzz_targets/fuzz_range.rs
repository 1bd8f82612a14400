//! Range parsing and set arithmetic must never panic, and printing must round-trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spiderpool_core::range::{IpFamily, IpRange, IpSet};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let entries: Vec<&str> = s.split(',').collect();
    if let Ok(r) = s.parse::<IpRange>() {
        let again: IpRange = r.to_string().parse().expect("printed range parses");
        assert_eq!(again, r);
    }
    for family in [IpFamily::V4, IpFamily::V6] {
        if let Ok(set) = IpSet::parse(family, &entries) {
            let reparsed = IpSet::parse(family, &set.to_strings()).expect("printed set parses");
            assert_eq!(reparsed, set);
            let half = set.subtract(&reparsed);
            assert!(half.is_empty());
            if let Some(n) = set.nth(set.count() / 2) {
                assert_eq!(set.index_of(n), Some(set.count() / 2));
            }
        }
    }
});
